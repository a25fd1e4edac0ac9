//! Commands: send one to a device, take the device's answer, read executions.

use std::sync::Arc;

use twin_model::command::{CommandError, CommandExecution, DeviceResponse, NewCommand};
use twin_model::{DeviceId, Rejection, RejectionKind};
use twin_telemetry::trace;

use crate::device::DeviceMsg;
use crate::error::FleetError;
use crate::fleet::{FleetHandle, Reply};

/// Commands (`fleet.commands()`).
#[derive(Clone, Copy)]
pub struct Commands<'a>(pub(crate) &'a FleetHandle);

impl Commands<'_> {
    /// Creates a command execution for `thing`; it reaches the device once the device
    /// subscribes to its command requests (at once if it already has).
    pub fn send(self, thing: &DeviceId, request: NewCommand) -> Reply<Arc<CommandExecution>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.command.send", %thing, name = %request.name),
        );
        self.0
            .request(thing, |reply, permit| DeviceMsg::SendCommand {
                request: Box::new(request),
                span,
                reply,
                permit,
            })
    }

    /// The device's answer to a command.
    pub fn respond(
        self,
        thing: &DeviceId,
        execution_id: String,
        response: Result<DeviceResponse, CommandError>,
    ) -> Reply<Arc<CommandExecution>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.command.respond", %thing, execution = %execution_id),
        );
        self.0
            .request(thing, |reply, permit| DeviceMsg::CommandResponse {
                execution_id,
                response: Box::new(response),
                span,
                reply,
                permit,
            })
    }

    /// A command execution by id, as its twin sees it now (its deadlines applied).
    pub async fn get(self, execution_id: &str) -> Result<Arc<CommandExecution>, FleetError> {
        let stored = self
            .0
            .twins
            .store()
            .command(execution_id)
            .await?
            .ok_or_else(|| {
                FleetError::Rejected(Rejection::new(
                    RejectionKind::NotFound,
                    format!("no command execution {execution_id}"),
                ))
            })?;
        let id = execution_id.to_owned();
        self.0
            .request(&stored.thing, |reply, permit| DeviceMsg::Command {
                execution_id: id,
                reply,
                permit,
            })
            .await
    }

    /// A thing's command executions, newest first, before the execution id `before`.
    pub async fn list(
        self,
        thing: &DeviceId,
        before: Option<String>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, FleetError> {
        Ok(self
            .0
            .twins
            .store()
            .commands(thing, before.as_deref(), limit)
            .await?)
    }
}
