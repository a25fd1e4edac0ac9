//! AWS IoT Jobs over MQTT: a device's requests on `$aws/things/{thing}/jobs/...`
//! (`get`, `start-next`, `{jobId}/get`, `{jobId}/update`), answered on `/accepted` or
//! `/rejected`, and `jobs/notify` and `jobs/notify-next` when its executions change.

use bytes::Bytes;
use serde_json::Value;
use twin_actors::JobRequestError;
use twin_model::DeviceId;
use twin_model::job::{JobError, JobErrorCode};
use twin_model::topic::{JobChannel, JobOp, JobTopic};

use super::{Call, Dispatch, Outbox, publish};

pub(crate) fn dispatch(t: JobTopic, body: &Bytes, room: bool, out: &mut dyn Outbox) -> Dispatch {
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Object(Default::default()))
    } else {
        serde_json::from_slice::<Value>(body)
    };
    let body = match parsed {
        Ok(v) if v.is_object() => v,
        _ => {
            let e = JobError::new(
                JobErrorCode::InvalidJson,
                "the request is not a JSON object",
            );
            reply(&t.thing, &t.op, None, Err(e), out);
            return Dispatch::Answered;
        }
    };
    let token = body
        .get("clientToken")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    if !room {
        let e = JobError::new(
            JobErrorCode::RequestThrottled,
            "too many requests in flight",
        );
        reply(&t.thing, &t.op, token.as_deref(), Err(e), out);
        return Dispatch::Answered;
    }
    Dispatch::Call(Call::Job {
        op: t.op,
        token,
        body,
    })
}

fn reply(
    thing: &DeviceId,
    op: &JobOp,
    token: Option<&str>,
    answer: Result<Value, JobError>,
    out: &mut dyn Outbox,
) {
    let (channel, payload) = match answer {
        Ok(accepted) => (JobChannel::Accepted, accepted),
        Err(e) => (
            JobChannel::Rejected,
            e.payload(token, twin_store::now_millis()),
        ),
    };
    let topic = JobTopic {
        thing: thing.clone(),
        op: op.clone(),
        channel,
    }
    .format();
    publish(out, topic, None, || payload);
}

pub(crate) fn answered(
    thing: &DeviceId,
    op: &JobOp,
    token: Option<&str>,
    result: Result<Value, JobRequestError>,
    out: &mut dyn Outbox,
) {
    let answer = result.map_err(|e| e.to_job_error());
    reply(thing, op, token, answer, out);
}

/// `jobs/notify` (the device's pending executions) and, when the next one changed,
/// `jobs/notify-next`.
pub(crate) fn notify(thing: &DeviceId, notify: &Value, next: Option<&Value>, out: &mut dyn Outbox) {
    let topic = |op| {
        JobTopic {
            thing: thing.clone(),
            op,
            channel: JobChannel::Request,
        }
        .format()
    };
    publish(out, topic(JobOp::Notify), None, || notify);
    if let Some(next) = next {
        publish(out, topic(JobOp::NotifyNext), None, || next);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Everything, request};
    use super::super::{Call, Dispatch, dispatch};
    use twin_model::Limits;

    #[test]
    fn a_request_that_is_not_a_json_object_is_rejected_as_invalid_json() {
        let mut out = Everything::default();
        let r = request("$aws/things/d/jobs/start-next", "[1]");
        assert!(matches!(
            dispatch(&r, true, &Limits::default(), &mut out),
            Dispatch::Answered
        ));
        let (topic, body) = &out.messages()[0];
        assert_eq!(topic, "$aws/things/d/jobs/start-next/rejected");
        assert_eq!(body["code"], "InvalidJson");
    }

    #[test]
    fn an_empty_body_is_an_empty_request_and_no_room_is_throttled() {
        let mut out = Everything::default();
        let r = request("$aws/things/d/jobs/get", "");
        assert!(matches!(
            dispatch(&r, true, &Limits::default(), &mut out),
            Dispatch::Call(Call::Job { .. })
        ));
        let r = request("$aws/things/d/jobs/get", r#"{"clientToken":"x"}"#);
        dispatch(&r, false, &Limits::default(), &mut out);
        let (_, body) = &out.messages()[0];
        assert_eq!(
            (body["code"].as_str(), body["clientToken"].as_str()),
            (Some("RequestThrottled"), Some("x"))
        );
    }

    #[test]
    fn notify_topics_are_not_requests() {
        let r = request("$aws/things/d/jobs/notify", "{}");
        assert!(matches!(
            dispatch(&r, true, &Limits::default(), &mut Everything::default()),
            Dispatch::Ignored(_)
        ));
    }
}
