//! The twin's commands: it holds its thing's pending executions, hands them to the
//! device's connection once the device listens, records the device's answers and applies
//! the clock. Every transition is durable before it is visible or announced.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use twin_model::command::{
    CommandError, CommandExecution, CommandStatus, DeviceResponse, NewCommand,
};
use twin_model::{Rejection, RejectionKind, TwinEvent};
use twin_store::{Write, secret};

use super::{DeviceMsg, DeviceState};
use crate::error::FleetError;

fn not_found(execution_id: &str) -> FleetError {
    Rejection::new(
        RejectionKind::NotFound,
        format!("no command execution {execution_id}"),
    )
    .into()
}

/// A new execution id: the creation time first, so that ids sort in creation order,
/// then randomness.
fn execution_id(now: u64) -> Result<String, FleetError> {
    let random = secret::generate()?;
    Ok(format!("{now:012x}{}", &random[..12]))
}

impl DeviceState {
    pub(super) async fn send_command(
        &mut self,
        request: NewCommand,
    ) -> Result<Arc<CommandExecution>, FleetError> {
        self.registered().await?;
        let now = self.ctx.now_millis();
        let mut execution =
            CommandExecution::new(execution_id(now)?, self.thing.clone(), request, now)
                .map_err(|e| FleetError::Rejected(e.into()))?;
        let deliver = self.listening && execution.delivered(now);
        let execution = Arc::new(execution);
        self.commit(vec![Write::Command(execution.clone())]).await?;
        if let Some(l) = self.loaded.as_mut() {
            l.commands
                .insert(execution.execution_id.clone(), (*execution).clone());
        }
        self.announce(&execution, deliver);
        self.set_alarm();
        Ok(execution)
    }

    pub(super) async fn command_response(
        &mut self,
        execution_id: &str,
        response: Result<DeviceResponse, CommandError>,
    ) -> Result<Arc<CommandExecution>, FleetError> {
        // A malformed answer is refused as such, whatever the execution's status.
        let response = response.map_err(|e| FleetError::Rejected(e.into()))?;
        self.expire_commands().await?;
        let now = self.ctx.now_millis();
        let Some(mut execution) = self.registered().await?.commands.get(execution_id).cloned()
        else {
            // Not pending: it ended, or it never existed for this thing.
            let ended = self.stored_command(execution_id).await?;
            return Err(FleetError::Rejected(
                CommandError::Terminal(ended.status).into(),
            ));
        };
        execution
            .respond(response, now)
            .map_err(|e| FleetError::Rejected(e.into()))?;
        let execution = Arc::new(execution);
        self.commit(vec![Write::Command(execution.clone())]).await?;
        self.keep(&execution);
        self.announce(&execution, false);
        Ok(execution)
    }

    pub(super) async fn command(
        &mut self,
        execution_id: &str,
    ) -> Result<Arc<CommandExecution>, FleetError> {
        self.expire_commands().await?;
        match self.registered().await?.commands.get(execution_id) {
            Some(c) => Ok(Arc::new(c.clone())),
            None => self.stored_command(execution_id).await.map(Arc::new),
        }
    }

    /// An ended execution of this thing, from the store.
    async fn stored_command(&self, execution_id: &str) -> Result<CommandExecution, FleetError> {
        let found = self.ctx.store().command(execution_id).await?;
        found
            .filter(|c| c.thing == self.thing)
            .ok_or_else(|| not_found(execution_id))
    }

    /// The device's connection `session` listens for commands: deliver what waits, and
    /// again what the device has not taken up yet (still `CREATED`: a device that lost
    /// its connection may not have received it). The device's deadline still counts
    /// from the first delivery.
    pub(super) async fn commands_wanted(&mut self, session: u64) -> Result<(), FleetError> {
        if session != self.session {
            return Ok(());
        }
        self.listening = true;
        self.expire_commands().await?;
        let now = self.ctx.now_millis();
        let (mut first, mut again) = (Vec::new(), Vec::new());
        for c in self.registered().await?.commands.values_mut() {
            if c.delivered(now) {
                first.push(Arc::new(c.clone()));
            } else if c.status == CommandStatus::Created {
                again.push(Arc::new(c.clone()));
            }
        }
        if !first.is_empty() {
            self.commit(first.iter().cloned().map(Write::Command).collect())
                .await?;
        }
        for c in first.iter().chain(&again) {
            self.announce(c, true);
        }
        self.set_alarm();
        Ok(())
    }

    /// A deadline has come: from the twin's own timer, or from its shard when the twin
    /// had been passivated (then it loads first).
    pub(super) async fn on_clock(&mut self) -> Result<(), FleetError> {
        self.load().await?;
        self.expire_commands().await?;
        self.expire_jobs().await
    }

    /// Applies the clock to the pending executions.
    pub(super) async fn expire_commands(&mut self) -> Result<(), FleetError> {
        self.alarm_at = None;
        let now = self.ctx.now_millis();
        let Some(loaded) = self.loaded.as_mut() else {
            return Ok(());
        };
        let mut ended = Vec::new();
        for c in loaded.commands.values_mut() {
            if c.expire(now) {
                ended.push(Arc::new(c.clone()));
            }
        }
        if !ended.is_empty() {
            self.commit(ended.iter().cloned().map(Write::Command).collect())
                .await?;
            for c in &ended {
                self.keep(c);
                self.announce(c, false);
            }
        }
        self.set_alarm();
        Ok(())
    }

    /// Keeps a pending execution's new state, or lets go of an ended one.
    fn keep(&mut self, execution: &CommandExecution) {
        if let Some(l) = self.loaded.as_mut() {
            if execution.status.is_terminal() {
                l.commands.remove(&execution.execution_id);
            } else {
                l.commands
                    .insert(execution.execution_id.clone(), execution.clone());
            }
        }
    }

    fn announce(&self, execution: &Arc<CommandExecution>, deliver: bool) {
        self.ctx.publish_event(TwinEvent::Command {
            thing: self.thing.clone(),
            execution: execution.clone(),
            deliver,
            version: self.version(),
            trace: twin_telemetry::trace::outgoing(),
        });
    }

    /// Wakes the twin at its next command or job deadline (one timer at a time).
    pub(super) fn set_alarm(&mut self) {
        let next = self.loaded.as_ref().and_then(|l| {
            let commands = l.commands.values().filter_map(|c| c.deadline());
            let jobs = l.jobs.values().filter_map(|e| e.deadline());
            commands.chain(jobs).min()
        });
        self.next_deadline
            .store(next.unwrap_or(0), Ordering::Relaxed);
        let Some(next) = next else {
            return;
        };
        if self.alarm_at.is_some_and(|at| at <= next) {
            return;
        }
        self.alarm_at = Some(next);
        let wait = Duration::from_millis(next.saturating_sub(self.ctx.now_millis()));
        self.myself.send_after(wait, || DeviceMsg::Clock.into());
    }
}
