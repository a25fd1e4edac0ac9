//! The AWS IoT device APIs over MQTT: [`shadow`] (Device Shadow), [`jobs`] (Jobs) and
//! [`commands`] (Commands). Each adapter turns a device's publish into a [`Call`] on its
//! twin (or refuses it at once), and the twin's answers and events into the messages the
//! API publishes. They are pure: calls are values, messages go into an [`Outbox`], and
//! the connection loop does the rest.

pub(crate) mod commands;
pub(crate) mod jobs;
pub(crate) mod shadow;
pub(crate) mod telemetry;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use twin_actors::{FleetError, FleetHandle, JobRequestError, TelemetryMessage};
use twin_model::command::{CommandError, CommandExecution, DeviceResponse};
use twin_model::history::Origin;
use twin_model::shadow::payload;
use twin_model::topic::{self, CommandChannel, JobChannel, JobOp, ShadowOp, Topic};
use twin_model::{
    DeviceId, Limits, Rejection, Shadow, ShadowChange, ShadowName, TwinEvent, UpdateRequest,
};

use crate::codec::PubAckCode;
use crate::protocol::{ReplyTo, Request};
use crate::session::OutMsg;

/// Where an adapter's messages go: the device's session queue, which keeps a message
/// only if the device subscribed to its topic.
pub(crate) trait Outbox {
    /// The QoS a message on `topic` goes out with; `None` when nothing subscribed.
    fn qos(&self, topic: &str) -> Option<u8>;
    fn push(&mut self, msg: OutMsg);
}

/// Queues a message on `topic` if the device subscribed to it; the payload is built only
/// then.
pub(crate) fn publish<P: serde::Serialize>(
    out: &mut dyn Outbox,
    topic: String,
    correlation_data: Option<Bytes>,
    build: impl FnOnce() -> P,
) {
    let Some(qos) = out.qos(&topic) else {
        return;
    };
    // Most payloads fit; a larger one grows the buffer once or twice.
    let mut buf = Vec::with_capacity(512);
    // Payloads are plain data: serializing them cannot fail.
    let _ = serde_json::to_writer(&mut buf, &build());
    out.push(OutMsg {
        topic,
        payload: Bytes::from(buf),
        qos,
        correlation_data,
        trace: None,
    });
}

/// An outbox whose messages continue a trace: they carry its `traceparent` (MQTT 5).
pub(crate) struct Traced<'a> {
    pub(crate) out: &'a mut dyn Outbox,
    pub(crate) trace: Option<Arc<str>>,
}

impl Outbox for Traced<'_> {
    fn qos(&self, topic: &str) -> Option<u8> {
        self.out.qos(topic)
    }

    fn push(&mut self, mut msg: OutMsg) {
        msg.trace.clone_from(&self.trace);
        self.out.push(msg);
    }
}

/// A request for the device's twin.
#[derive(Debug)]
pub(crate) enum Call {
    UpdateShadow {
        shadow: ShadowName,
        request: UpdateRequest,
    },
    GetShadow {
        shadow: ShadowName,
        token: Option<String>,
    },
    DeleteShadow {
        shadow: ShadowName,
        token: Option<String>,
    },
    CommandResponse {
        execution_id: String,
        /// Parsed; a malformed one is refused by the twin, which knows the execution.
        response: Result<DeviceResponse, CommandError>,
        reply_to: ReplyTo,
    },
    Job {
        op: JobOp,
        token: Option<String>,
        body: Value,
    },
    Telemetry(TelemetryMessage),
}

/// What became of a device's publish.
#[derive(Debug)]
pub(crate) enum Dispatch {
    /// A request for the twin: its answer comes later.
    Call(Call),
    /// Refused at once: the refusal is in the outbox.
    Answered,
    /// Not a request of the device APIs (why not).
    Ignored(String),
    /// Refused at once with this PUBACK (why).
    Refused(PubAckCode, String),
}

/// A twin's answer to a [`Call`].
pub(crate) enum Answer {
    Update(
        ShadowName,
        Option<String>,
        Result<Arc<ShadowChange>, FleetError>,
    ),
    Get(ShadowName, Option<String>, Result<Arc<Shadow>, FleetError>),
    Delete(
        ShadowName,
        Option<String>,
        Result<Arc<ShadowChange>, FleetError>,
    ),
    Command(String, ReplyTo, Result<Arc<CommandExecution>, FleetError>),
    Job(JobOp, Option<String>, Result<Value, JobRequestError>),
    Telemetry(Result<(), FleetError>),
}

impl Answer {
    /// The PUBACK the request's answer goes with.
    pub(crate) fn ack_code(&self) -> PubAckCode {
        match self {
            Self::Telemetry(result) => telemetry::acked(result),
            _ => PubAckCode::Success,
        }
    }
}

/// A twin's answer, with the packet id of the request's PUBACK (sent with the answer).
pub(crate) type AnswerFuture = Pin<Box<dyn Future<Output = (Option<u16>, Answer)> + Send>>;

/// An answer on its way, with the `traceparent` its messages carry.
pub(crate) type TracedAnswer =
    Pin<Box<dyn Future<Output = (Option<u16>, Option<Arc<str>>, Answer)> + Send>>;

impl Call {
    /// Hands the call to `thing`'s twin (in order with the thing's other calls).
    pub(crate) fn send(
        self,
        fleet: &FleetHandle,
        thing: &DeviceId,
        ack: Option<u16>,
    ) -> AnswerFuture {
        match self {
            Self::UpdateShadow { shadow, request } => {
                let token = request.client_token.clone();
                let reply = fleet
                    .shadows()
                    .update(thing, shadow.clone(), request, Origin::Device);
                Box::pin(async move { (ack, Answer::Update(shadow, token, reply.await)) })
            }
            Self::GetShadow { shadow, token } => {
                let reply = fleet.shadows().get(thing, shadow.clone());
                Box::pin(async move { (ack, Answer::Get(shadow, token, reply.await)) })
            }
            Self::DeleteShadow { shadow, token } => {
                let reply =
                    fleet
                        .shadows()
                        .delete(thing, shadow.clone(), token.clone(), Origin::Device);
                Box::pin(async move { (ack, Answer::Delete(shadow, token, reply.await)) })
            }
            Self::CommandResponse {
                execution_id,
                response,
                reply_to,
            } => {
                let reply = fleet
                    .commands()
                    .respond(thing, execution_id.clone(), response);
                Box::pin(async move { (ack, Answer::Command(execution_id, reply_to, reply.await)) })
            }
            Self::Job { op, token, body } => {
                let reply = fleet.jobs().request(thing, op.clone(), body);
                Box::pin(async move { (ack, Answer::Job(op, token, reply.await)) })
            }
            Self::Telemetry(message) => {
                let reply = fleet.telemetry().record(thing, message);
                Box::pin(async move { (ack, Answer::Telemetry(reply.await)) })
            }
        }
    }
}

/// Reads a device's publish in its own topics (the ACL let it through). `room`: whether
/// another request may go to the twin; without room a request is refused with the API's
/// "too many requests" answer.
pub(crate) fn dispatch(
    request: &Request,
    room: bool,
    limits: &Limits,
    out: &mut dyn Outbox,
) -> Dispatch {
    if let Some(destination) = &request.telemetry {
        return telemetry::dispatch(destination, request, room, limits);
    }
    let body = &request.payload;
    match topic::parse(&request.topic) {
        Ok(Topic::Shadow(t)) => shadow::dispatch(t, body, room, limits, out),
        Ok(Topic::Command(t)) if t.channel == CommandChannel::Response => {
            commands::dispatch(t, body, request.reply_to.clone(), room, out)
        }
        Ok(Topic::Job(t))
            if t.channel == JobChannel::Request
                && !matches!(t.op, JobOp::Notify | JobOp::NotifyNext) =>
        {
            jobs::dispatch(t, body, room, out)
        }
        Err(topic::TopicError::ShadowName(e)) if shadow::is_request(&request.topic) => {
            // As AWS answers a request it cannot take: on the request's `rejected` topic.
            let rejection = Rejection::bad_request(format!("Invalid shadow name: {e}"));
            publish(out, format!("{}/rejected", request.topic), None, || {
                payload::rejected(&rejection, now_secs(), None)
            });
            Dispatch::Answered
        }
        Err(e) => Dispatch::Ignored(e.to_string()),
        Ok(_) => Dispatch::Ignored("not a request topic".into()),
    }
}

/// Publishes the twin's answer to a call.
pub(crate) fn answer(thing: &DeviceId, answer: Answer, out: &mut dyn Outbox) {
    match answer {
        Answer::Update(shadow, token, result) => shadow::change_answered(
            thing,
            ShadowOp::Update,
            &shadow,
            token.as_deref(),
            result,
            out,
        ),
        Answer::Get(shadow, token, result) => {
            shadow::get_answered(thing, &shadow, token.as_deref(), result, out)
        }
        Answer::Delete(shadow, token, result) => shadow::change_answered(
            thing,
            ShadowOp::Delete,
            &shadow,
            token.as_deref(),
            result,
            out,
        ),
        Answer::Command(id, reply_to, result) => {
            commands::answered(thing, &id, reply_to, result, out)
        }
        Answer::Job(op, token, result) => jobs::answered(thing, &op, token.as_deref(), result, out),
        Answer::Telemetry(_) => {}
    }
}

/// Publishes what a twin event means to the device.
pub(crate) fn event(thing: &DeviceId, event: &TwinEvent, out: &mut dyn Outbox) {
    match event {
        TwinEvent::Shadow { .. } => shadow::event(event, out),
        TwinEvent::Job {
            notify,
            notify_next,
            ..
        } => jobs::notify(thing, notify, notify_next.as_deref(), out),
        TwinEvent::Command {
            execution,
            deliver: true,
            ..
        } => commands::deliver(thing, execution, out),
        _ => {}
    }
}

fn now_secs() -> u64 {
    twin_store::now_millis() / 1000
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An outbox whose device subscribed to everything, at QoS 1.
    #[derive(Default)]
    pub(crate) struct Everything(pub(crate) Vec<OutMsg>);

    impl Outbox for Everything {
        fn qos(&self, _: &str) -> Option<u8> {
            Some(1)
        }
        fn push(&mut self, msg: OutMsg) {
            self.0.push(msg);
        }
    }

    impl Everything {
        /// Each message's topic and JSON payload.
        pub(crate) fn messages(&self) -> Vec<(String, serde_json::Value)> {
            self.0
                .iter()
                .map(|m| (m.topic.clone(), serde_json::from_slice(&m.payload).unwrap()))
                .collect()
        }
    }

    pub(crate) fn request(topic: &str, body: &str) -> Request {
        Request {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(body.as_bytes()),
            ack: Some(1),
            reply_to: None,
            traceparent: None,
            telemetry: None,
        }
    }
}
