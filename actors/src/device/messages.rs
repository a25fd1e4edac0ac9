//! Messages of the `DeviceTwin` actor.

use std::sync::Arc;

use ractor::RpcReplyPort;
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use twin_model::certificate::CertificateId;
use twin_model::command::{CommandError, CommandExecution, DeviceResponse, NewCommand};
use twin_model::history::Origin;
use twin_model::job::{JobDefinition, JobExecution};
use twin_model::telemetry::Reading;
use twin_model::topic::JobOp;
use twin_model::{Shadow, ShadowChange, ShadowName, UpdateRequest};

use crate::error::FleetError;
use crate::fleet::ConnectOk;
use crate::telemetry::{Mailbox, Queued};

pub type AnswerPort<T> = RpcReplyPort<Result<T, FleetError>>;

/// A message in a twin's mailbox, counted there until the twin takes it.
pub struct Mail {
    pub(crate) msg: DeviceMsg,
    queued: Queued,
}

impl From<DeviceMsg> for Mail {
    fn from(msg: DeviceMsg) -> Self {
        Self {
            msg,
            queued: Queued::new(Mailbox::Twin),
        }
    }
}

impl Mail {
    /// The message, taken out of the mailbox.
    pub(crate) fn take(self) -> DeviceMsg {
        drop(self.queued);
        self.msg
    }
}

pub enum DeviceMsg {
    Update {
        shadow: ShadowName,
        request: Box<UpdateRequest>,
        by: Origin,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<ShadowChange>>,
        permit: OwnedSemaphorePermit,
    },
    Get {
        shadow: ShadowName,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<Shadow>>,
        permit: OwnedSemaphorePermit,
    },
    Delete {
        shadow: ShadowName,
        client_token: Option<String>,
        by: Origin,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<ShadowChange>>,
        permit: OwnedSemaphorePermit,
    },
    /// A device authenticates and comes online.
    Connect {
        credential: Credential,
        reply: AnswerPort<ConnectOk>,
        permit: OwnedSemaphorePermit,
    },
    /// The connection of `session` ended.
    Disconnected { session: u64, reason: String },
    /// Changes the thing's registry record; replies with a new secret where the change
    /// made one (shown once, never stored).
    Registry {
        op: RegistryOp,
        reply: AnswerPort<Option<String>>,
        permit: OwnedSemaphorePermit,
    },
    /// Creates a command execution; it goes to the device as soon as the device listens.
    SendCommand {
        request: Box<NewCommand>,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<CommandExecution>>,
        permit: OwnedSemaphorePermit,
    },
    /// The device answered a command (the response as parsed, or why it did not parse).
    CommandResponse {
        execution_id: String,
        response: Box<Result<DeviceResponse, CommandError>>,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<CommandExecution>>,
        permit: OwnedSemaphorePermit,
    },
    /// One command execution as it is now.
    Command {
        execution_id: String,
        reply: AnswerPort<Arc<CommandExecution>>,
        permit: OwnedSemaphorePermit,
    },
    /// The connection of `session` subscribed to its command requests: deliver what waits.
    CommandsWanted { session: u64 },
    /// Queues a job's execution for the thing.
    QueueJob {
        job: Arc<JobDefinition>,
        /// The release's trace context (see `Update`).
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<Arc<JobExecution>>,
        permit: OwnedSemaphorePermit,
    },
    /// Ends the thing's execution of a job early.
    EndJob {
        job_id: String,
        ending: Ending,
        running: Running,
        reply: AnswerPort<Result<Arc<JobExecution>, twin_model::job::JobError>>,
        permit: OwnedSemaphorePermit,
    },
    /// A device request on the jobs topics, with its JSON body.
    JobRequest {
        op: JobOp,
        body: serde_json::Value,
        /// The request's trace context: its span, which the twin works in (its parent is
        /// the caller's), or the caller's `traceparent` to send on.
        span: twin_telemetry::trace::Carried,
        reply: AnswerPort<super::jobs::JobAnswer>,
        permit: OwnedSemaphorePermit,
    },
    /// A device's telemetry message: kept as the latest values and the series, and sent
    /// to the routes that take it.
    Telemetry {
        message: Box<TelemetryMessage>,
        reply: AnswerPort<()>,
        permit: OwnedSemaphorePermit,
    },
    /// A command or job deadline is due.
    Clock,
    /// Test hook: panics inside the actor.
    #[cfg(test)]
    Crash,
}

/// A telemetry message as a device published it.
#[derive(Debug, Clone)]
pub struct TelemetryMessage {
    pub reading: Reading,
    /// The topic it was published on.
    pub topic: String,
    /// The reading's type, where the topic names one (`{type}`).
    pub kind: Option<String>,
    /// AWS IoT Basic Ingest: the name of the route it goes to, alone.
    pub route: Option<String>,
}

#[derive(Debug, Clone)]
/// How a device proves it is the thing it connects as.
pub enum Credential {
    /// The thing's secret (MQTT password).
    Password(Option<String>),
    /// A client certificate, checked registered and ACTIVE by the caller: the twin checks
    /// that it is attached to the thing.
    Certificate(CertificateId),
}

pub enum RegistryOp {
    /// Registers the thing with these attributes and a new secret.
    Register(Map<String, Value>),
    /// Disabling ends the live connection and refuses new ones.
    SetEnabled(bool),
    /// A merge patch: `null` deletes an attribute.
    MergeAttributes(Map<String, Value>),
    /// A new secret; the old one stops working and the live connection ends.
    RotateSecret,
    /// Removes the thing, its shadows and history; ends the live connection.
    Delete,
    /// Lets a registered certificate log in as the thing.
    AttachCertificate(CertificateId),
    /// Stops a certificate logging in as the thing.
    DetachCertificate(CertificateId),
}

/// How a thing's execution of a job ends early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The thing was taken out of the job: `REMOVED`.
    Removed,
    /// The job was canceled: `CANCELED`.
    Canceled,
}

/// What ending a job early does to an `IN_PROGRESS` execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// It goes on: only queued executions end (the request is refused for it).
    Spared,
    /// It ends too (the operator's `force`).
    Ended,
}

impl Running {
    /// From an API's `force` flag.
    pub fn ended_if(force: bool) -> Self {
        if force { Self::Ended } else { Self::Spared }
    }
}
