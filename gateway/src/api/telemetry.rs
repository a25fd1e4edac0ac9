//! Device telemetry: a publish on a telemetry topic (the core checked that it names the
//! publishing thing) becomes a call on the thing's twin, which answers once the reading
//! is durable; its PUBACK waits for that answer.

use twin_actors::{FleetError, TelemetryMessage};
use twin_model::telemetry::{Destination, Reading};
use twin_model::{Limits, RejectionKind};

use super::{Call, Dispatch};
use crate::codec::PubAckCode;
use crate::protocol::Request;

/// Reads a telemetry publish: a call, or its refusal when the payload does not parse or
/// the connection has too many requests waiting.
pub(crate) fn dispatch(
    destination: &Destination,
    request: &Request,
    room: bool,
    limits: &Limits,
) -> Dispatch {
    if !room {
        return Dispatch::Refused(
            PubAckCode::QuotaExceeded,
            "too many requests waiting for the twin (mqtt_max_inflight_requests)".into(),
        );
    }
    let reading = match Reading::parse(&request.payload, twin_store::now_millis(), limits.max_depth)
    {
        Ok(reading) => reading,
        Err(why) => return Dispatch::Refused(PubAckCode::PayloadFormatInvalid, why),
    };
    let (kind, route) = match destination {
        Destination::Topic { kind, .. } => (kind.clone(), None),
        Destination::BasicIngest { route } => (None, Some(route.clone())),
    };
    Dispatch::Call(Call::Telemetry(TelemetryMessage {
        reading,
        topic: request.topic.clone(),
        kind,
        route,
    }))
}

/// The PUBACK of a telemetry message the twin answered: `Success` once durable, or why
/// not.
pub(crate) fn acked(result: &Result<(), FleetError>) -> PubAckCode {
    match result {
        Ok(()) => PubAckCode::Success,
        Err(FleetError::Rejected(r)) => match r.kind {
            RejectionKind::BadRequest
            | RejectionKind::PayloadTooLarge
            | RejectionKind::UnsupportedEncoding => PubAckCode::PayloadFormatInvalid,
            RejectionKind::Unauthorized | RejectionKind::Forbidden => PubAckCode::NotAuthorized,
            RejectionKind::NotFound => PubAckCode::TopicNameInvalid,
            RejectionKind::TooManyRequests => PubAckCode::QuotaExceeded,
            RejectionKind::VersionConflict
            | RejectionKind::Internal
            | RejectionKind::Unavailable => PubAckCode::UnspecifiedError,
        },
        Err(FleetError::Overloaded) => PubAckCode::QuotaExceeded,
        Err(_) => PubAckCode::UnspecifiedError,
    }
}
