//! Commands: one instruction to one device, modelled on AWS IoT Device Management
//! commands, as a pure state machine with time passed in (milliseconds since the epoch).
//!
//! ```text
//! CREATED ──device──▶ IN_PROGRESS ──device──▶ SUCCEEDED | FAILED | REJECTED
//!    │                     │
//!    └─────── clock ───────┴──────────────▶ TIMED_OUT
//! ```
//!
//! A command waits in `CREATED` until it has been delivered to the connected device; if it
//! is still undelivered when it expires (`expires_at`), it ends `TIMED_OUT` with the reason
//! `EXPIRED`. Once delivered, the device has `timeout_ms` to reach a terminal status, or it
//! ends `TIMED_OUT` with the reason `DEVICE_TIMEOUT`. Terminal statuses never change again:
//! a late device response is refused, and the device is told why.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{DeviceId, Rejection, RejectionKind};

/// The longest a command may wait to be delivered, or run once delivered: one day.
pub const MAX_SECONDS: u64 = 86_400;
/// Longest reason code and description a device may send.
pub const MAX_REASON_CODE: usize = 64;
pub const MAX_REASON_DESCRIPTION: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandStatus {
    Created,
    InProgress,
    Succeeded,
    Failed,
    Rejected,
    TimedOut,
}

impl CommandStatus {
    pub const ALL: [Self; 6] = [
        Self::Created,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::Rejected,
        Self::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Created | Self::InProgress)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "CREATED",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Rejected => "REJECTED",
            Self::TimedOut => "TIMED_OUT",
        }
    }
}

/// Why a command is in its status, as the device (or the clock) said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReason {
    pub reason_code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason_description: String,
}

/// Why a command or a device response was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The request or response is malformed (`InvalidRequest`).
    #[error("{0}")]
    Invalid(String),
    /// The execution already ended (`TerminalStateReached`).
    #[error("the command execution already ended {}", .0.as_str())]
    Terminal(CommandStatus),
}

impl CommandError {
    /// The `error` code of a `response/rejected` answer.
    pub fn code(&self) -> &'static str {
        error_code(Rejection::from(self.clone()).kind)
    }
}

/// A refused command request or response as a [`Rejection`]: `InvalidRequest` is a bad
/// request, `TerminalStateReached` a conflict with the execution's current status.
impl From<CommandError> for Rejection {
    fn from(e: CommandError) -> Self {
        let kind = match e {
            CommandError::Invalid(_) => RejectionKind::BadRequest,
            CommandError::Terminal(_) => RejectionKind::VersionConflict,
        };
        Rejection::new(kind, e.to_string())
    }
}

/// The `error` code of a `response/rejected` answer for a refusal of `kind`.
pub fn error_code(kind: RejectionKind) -> &'static str {
    match kind {
        RejectionKind::BadRequest | RejectionKind::PayloadTooLarge => "InvalidRequest",
        RejectionKind::VersionConflict => "TerminalStateReached",
        RejectionKind::NotFound => "ResourceNotFound",
        RejectionKind::TooManyRequests => "RequestThrottled",
        RejectionKind::Unauthorized | RejectionKind::Forbidden => "AccessDenied",
        RejectionKind::UnsupportedEncoding => "UnsupportedPayloadFormat",
        RejectionKind::Internal | RejectionKind::Unavailable => "InternalError",
    }
}

/// A device's answer on `.../executions/{id}/response/json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceResponse {
    pub status: CommandStatus,
    pub reason: Option<StatusReason>,
    pub result: Option<Map<String, Value>>,
}

/// Other fields (a `clientToken` from an SDK, say) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResponse {
    status: String,
    #[serde(default)]
    status_reason: Option<StatusReason>,
    #[serde(default)]
    result: Option<Map<String, Value>>,
}

impl DeviceResponse {
    pub fn parse(body: &[u8]) -> Result<Self, CommandError> {
        let raw: RawResponse = serde_json::from_slice(body)
            .map_err(|e| CommandError::Invalid(format!("the response is not valid: {e}")))?;
        let status = match raw.status.as_str() {
            "IN_PROGRESS" => CommandStatus::InProgress,
            "SUCCEEDED" => CommandStatus::Succeeded,
            "FAILED" => CommandStatus::Failed,
            "REJECTED" => CommandStatus::Rejected,
            other => {
                return Err(CommandError::Invalid(format!(
                    "status {other:?} cannot come from a device: use IN_PROGRESS, SUCCEEDED, FAILED or REJECTED"
                )));
            }
        };
        if let Some(r) = &raw.status_reason {
            let valid_code = !r.reason_code.is_empty()
                && r.reason_code.len() <= MAX_REASON_CODE
                && r.reason_code.bytes().all(|b| {
                    b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid_code {
                return Err(CommandError::Invalid(format!(
                    "reasonCode must be 1-{MAX_REASON_CODE} characters of A-Z, 0-9, _ and -"
                )));
            }
            if r.reason_description.len() > MAX_REASON_DESCRIPTION {
                return Err(CommandError::Invalid(format!(
                    "reasonDescription is longer than {MAX_REASON_DESCRIPTION} bytes"
                )));
            }
        }
        Ok(Self {
            status,
            reason: raw.status_reason,
            result: raw.result,
        })
    }
}

/// One command sent to one thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandExecution {
    pub execution_id: String,
    pub thing: DeviceId,
    pub name: String,
    pub payload: Value,
    pub status: CommandStatus,
    pub reason: Option<StatusReason>,
    pub result: Option<Map<String, Value>>,
    pub created_at: u64,
    /// When the request was first handed to the device's connection.
    pub delivered_at: Option<u64>,
    pub updated_at: u64,
    pub completed_at: Option<u64>,
    /// How long the device has, once delivered, to reach a terminal status.
    pub timeout_ms: u64,
    /// Undelivered at this time, the command ends `TIMED_OUT` (`EXPIRED`).
    pub expires_at: u64,
    /// One more on every transition.
    pub version: u64,
}

/// What `sendCommand` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    pub name: String,
    pub payload: Value,
    pub timeout_seconds: u64,
    pub expires_in_seconds: u64,
}

impl CommandExecution {
    pub fn new(
        execution_id: String,
        thing: DeviceId,
        request: NewCommand,
        now: u64,
    ) -> Result<Self, CommandError> {
        let NewCommand {
            name,
            payload,
            timeout_seconds,
            expires_in_seconds,
        } = request;
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            return Err(CommandError::Invalid(
                "the command name must be 1-128 characters of A-Z, a-z, 0-9, _ - . :".into(),
            ));
        }
        for (what, secs) in [
            ("timeoutSeconds", timeout_seconds),
            ("expiresInSeconds", expires_in_seconds),
        ] {
            if !(1..=MAX_SECONDS).contains(&secs) {
                return Err(CommandError::Invalid(format!(
                    "{what} must be between 1 and {MAX_SECONDS}"
                )));
            }
        }
        Ok(Self {
            execution_id,
            thing,
            name,
            payload,
            status: CommandStatus::Created,
            reason: None,
            result: None,
            created_at: now,
            delivered_at: None,
            updated_at: now,
            completed_at: None,
            timeout_ms: timeout_seconds * 1000,
            expires_at: now + expires_in_seconds * 1000,
            version: 1,
        })
    }

    /// When the clock next matters: the expiry while undelivered, the device's deadline
    /// once delivered, nothing once ended.
    pub fn deadline(&self) -> Option<u64> {
        if self.status.is_terminal() {
            return None;
        }
        Some(match self.delivered_at {
            None => self.expires_at,
            Some(at) => at + self.timeout_ms,
        })
    }

    /// Whether the command should go to the device now (connected, not yet delivered,
    /// not expired).
    pub fn wants_delivery(&self, now: u64) -> bool {
        self.status == CommandStatus::Created
            && self.delivered_at.is_none()
            && now < self.expires_at
    }

    /// Records that the request went to the device. The status stays `CREATED` until the
    /// device says otherwise, as in AWS IoT. Returns false when there was nothing to do.
    pub fn delivered(&mut self, now: u64) -> bool {
        if !self.wants_delivery(now) {
            return false;
        }
        self.delivered_at = Some(now);
        self.touch(now);
        true
    }

    /// The device's response. A response before delivery was recorded counts as delivery
    /// (a device may answer a request it got from a previous session).
    pub fn respond(&mut self, response: DeviceResponse, now: u64) -> Result<(), CommandError> {
        self.expire(now);
        if self.status.is_terminal() {
            return Err(CommandError::Terminal(self.status));
        }
        if self.delivered_at.is_none() {
            self.delivered_at = Some(now);
        }
        self.status = response.status;
        self.reason = response.reason;
        if response.result.is_some() {
            self.result = response.result;
        }
        if self.status.is_terminal() {
            self.completed_at = Some(now);
        }
        self.touch(now);
        Ok(())
    }

    /// Applies the clock: returns true when the command has just timed out.
    pub fn expire(&mut self, now: u64) -> bool {
        let Some(deadline) = self.deadline() else {
            return false;
        };
        if now < deadline {
            return false;
        }
        let code = if self.delivered_at.is_none() {
            "EXPIRED"
        } else {
            "DEVICE_TIMEOUT"
        };
        self.status = CommandStatus::TimedOut;
        self.reason = Some(StatusReason {
            reason_code: code.into(),
            reason_description: String::new(),
        });
        self.completed_at = Some(now);
        self.touch(now);
        true
    }

    fn touch(&mut self, now: u64) {
        self.updated_at = self.updated_at.max(now);
        self.version += 1;
    }

    /// The `response/accepted` answer.
    pub fn accepted_payload(&self) -> Value {
        let mut m = Map::new();
        m.insert("executionId".into(), self.execution_id.clone().into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert("timestamp".into(), self.updated_at.into());
        Value::Object(m)
    }

    /// The `response/rejected` answer.
    pub fn rejected_payload(execution_id: &str, rejection: &Rejection, now: u64) -> Value {
        let mut m = Map::new();
        m.insert("executionId".into(), execution_id.into());
        m.insert("error".into(), error_code(rejection.kind).into());
        m.insert("errorMessage".into(), rejection.message.clone().into());
        m.insert("timestamp".into(), now.into());
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command(now: u64) -> CommandExecution {
        CommandExecution::new(
            "e1".into(),
            DeviceId::parse("lamp").unwrap(),
            NewCommand {
                name: "reboot".into(),
                payload: json!({"delay": 5}),
                timeout_seconds: 30,
                expires_in_seconds: 600,
            },
            now,
        )
        .unwrap()
    }

    fn response(body: serde_json::Value) -> DeviceResponse {
        DeviceResponse::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_delivered_command_runs_to_success() {
        let mut c = command(1_000);
        assert!(c.wants_delivery(1_000));
        assert!(c.delivered(2_000));
        assert!(!c.delivered(2_500), "delivered once");
        assert_eq!(c.status, CommandStatus::Created);
        assert_eq!(c.deadline(), Some(32_000));
        c.respond(response(json!({"status": "IN_PROGRESS"})), 3_000)
            .unwrap();
        c.respond(
            response(json!({"status": "SUCCEEDED", "result": {"uptime": {"n": 0}}})),
            4_000,
        )
        .unwrap();
        assert_eq!(c.status, CommandStatus::Succeeded);
        assert_eq!(c.completed_at, Some(4_000));
        assert_eq!(c.result.as_ref().unwrap()["uptime"], json!({"n": 0}));
        assert_eq!(c.deadline(), None);
        assert_eq!(c.version, 4);
        let e = c
            .respond(response(json!({"status": "FAILED"})), 5_000)
            .unwrap_err();
        assert_eq!(e, CommandError::Terminal(CommandStatus::Succeeded));
        assert_eq!(e.code(), "TerminalStateReached");
    }

    #[test]
    fn an_undelivered_command_expires_and_a_silent_device_times_out() {
        let mut offline = command(0);
        assert!(!offline.expire(599_999));
        assert!(offline.expire(600_000));
        assert_eq!(offline.status, CommandStatus::TimedOut);
        assert_eq!(offline.reason.as_ref().unwrap().reason_code, "EXPIRED");
        assert!(!offline.wants_delivery(600_001));

        let mut silent = command(0);
        silent.delivered(10_000);
        assert!(!silent.expire(39_999));
        assert!(silent.expire(40_000));
        assert_eq!(
            silent.reason.as_ref().unwrap().reason_code,
            "DEVICE_TIMEOUT"
        );
        // A late answer is refused: the clock won.
        let late = silent.respond(response(json!({"status": "SUCCEEDED"})), 41_000);
        assert_eq!(late, Err(CommandError::Terminal(CommandStatus::TimedOut)));
    }

    #[test]
    fn a_response_past_the_deadline_is_refused_even_before_the_clock_ran() {
        let mut c = command(0);
        c.delivered(0);
        let e = c
            .respond(response(json!({"status": "SUCCEEDED"})), 30_000)
            .unwrap_err();
        assert_eq!(e, CommandError::Terminal(CommandStatus::TimedOut));
    }

    #[test]
    fn bad_responses_and_requests_say_why() {
        for (body, needle) in [
            (json!({"status": "CREATED"}), "cannot come from a device"),
            (json!({"status": "DONE"}), "cannot come from a device"),
            (json!({"state": "SUCCEEDED"}), "not valid"),
            (
                json!({"status": "FAILED", "statusReason": {"reasonCode": "low battery"}}),
                "reasonCode",
            ),
            (
                json!({"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "d".repeat(1025)}}),
                "reasonDescription",
            ),
        ] {
            let e = DeviceResponse::parse(body.to_string().as_bytes()).unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
            assert_eq!(e.code(), "InvalidRequest");
        }
        assert!(DeviceResponse::parse(b"not json").is_err());
        let r = response(
            json!({"status": "REJECTED", "statusReason": {"reasonCode": "DEVICE_TOO_BUSY"}, "clientToken": "t"}),
        );
        assert_eq!(r.status, CommandStatus::Rejected);

        let thing = DeviceId::parse("lamp").unwrap();
        for (name, timeout, expires) in [("", 1, 1), ("a b", 1, 1), ("ok", 0, 1), ("ok", 1, 86_401)]
        {
            let r = CommandExecution::new(
                "e".into(),
                thing.clone(),
                NewCommand {
                    name: name.into(),
                    payload: json!({}),
                    timeout_seconds: timeout,
                    expires_in_seconds: expires,
                },
                0,
            );
            assert!(
                matches!(r, Err(CommandError::Invalid(_))),
                "{name} {timeout} {expires}"
            );
        }
    }

    #[test]
    fn payloads_follow_the_aws_shapes() {
        let mut c = command(0);
        c.delivered(1);
        c.respond(response(json!({"status": "IN_PROGRESS"})), 7)
            .unwrap();
        assert_eq!(
            c.accepted_payload(),
            json!({"executionId": "e1", "status": "IN_PROGRESS", "timestamp": 7})
        );
        let rejected = CommandExecution::rejected_payload(
            "e1",
            &CommandError::Terminal(CommandStatus::Failed).into(),
            9,
        );
        assert_eq!(rejected["error"], "TerminalStateReached");
        assert_eq!(rejected["executionId"], "e1");
        assert_eq!(
            rejected["errorMessage"],
            "the command execution already ended FAILED"
        );
    }
}
