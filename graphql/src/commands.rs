//! Commands in the schema: the execution type, its connection and its event stream.

use std::sync::Arc;

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Enum, ID, Json, Object, SimpleObject, Union};
use serde_json::Value;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use twin_actors::Change;
use twin_model::command::{self, CommandExecution};
use twin_model::{DeviceId, TwinEvent};

use crate::schema::{DateTime, Lagged, PageInfo, Subscribed};

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(name = "CommandStatus")]
pub enum Status {
    /// Waiting to be delivered, or delivered and not yet taken up by the device.
    Created,
    InProgress,
    Succeeded,
    Failed,
    Rejected,
    /// Not delivered before it expired, or not finished within its timeout.
    TimedOut,
}

impl From<command::CommandStatus> for Status {
    fn from(s: command::CommandStatus) -> Self {
        use command::CommandStatus as S;
        match s {
            S::Created => Self::Created,
            S::InProgress => Self::InProgress,
            S::Succeeded => Self::Succeeded,
            S::Failed => Self::Failed,
            S::Rejected => Self::Rejected,
            S::TimedOut => Self::TimedOut,
        }
    }
}

#[derive(SimpleObject)]
pub struct StatusReason {
    pub reason_code: String,
    pub reason_description: Option<String>,
}

/// One command sent to one thing.
pub struct Command(pub Arc<CommandExecution>);

#[Object(name = "CommandExecution")]
impl Command {
    async fn execution_id(&self) -> ID {
        ID(self.0.execution_id.clone())
    }

    async fn thing_id(&self) -> ID {
        ID(self.0.thing.to_string())
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    /// What the device receives on `$aws/commands/things/{thing}/executions/{id}/request/json`.
    async fn payload(&self) -> Json<Value> {
        Json(self.0.payload.clone())
    }

    async fn status(&self) -> Status {
        self.0.status.into()
    }

    async fn status_reason(&self) -> Option<StatusReason> {
        self.0.reason.as_ref().map(|r| StatusReason {
            reason_code: r.reason_code.clone(),
            reason_description: (!r.reason_description.is_empty())
                .then(|| r.reason_description.clone()),
        })
    }

    /// What the device reported with its status.
    async fn result(&self) -> Option<Json<Value>> {
        self.0.result.clone().map(|r| Json(Value::Object(r)))
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    /// When it was first handed to the device's connection.
    async fn delivered_at(&self) -> Option<DateTime> {
        self.0.delivered_at.map(DateTime)
    }

    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }

    async fn completed_at(&self) -> Option<DateTime> {
        self.0.completed_at.map(DateTime)
    }

    /// How long the device has, once delivered, to finish.
    async fn timeout_seconds(&self) -> u64 {
        self.0.timeout_ms / 1000
    }

    /// Undelivered by then, the command times out.
    async fn expires_at(&self) -> DateTime {
        DateTime(self.0.expires_at)
    }

    /// One more on every change.
    async fn version(&self) -> u64 {
        self.0.version
    }
}

#[derive(SimpleObject)]
pub struct CommandConnection {
    pub edges: Vec<CommandEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct CommandEdge {
    /// Pass as `after` to continue with older executions.
    pub cursor: String,
    pub node: Command,
}

/// What `commandUpdated` delivers: `Subscribed` first, then every change.
#[derive(Union)]
pub enum CommandEvent {
    Subscribed(Subscribed),
    CommandUpdated(Command),
    Lagged(Lagged),
}

/// The command events of `thing` from `rx`, with `Lagged` where the subscriber fell
/// behind (it should then read the thing's `commands`).
pub fn updates(rx: Receiver<Change>, thing: DeviceId) -> impl Stream<Item = CommandEvent> + use<> {
    let subscribed = CommandEvent::Subscribed(Subscribed {
        thing_id: Some(ID(thing.to_string())),
        version: None,
    });
    let live = stream::unfold((rx, thing), |(mut rx, thing)| async move {
        loop {
            match rx.recv().await {
                Ok(change) => {
                    if let TwinEvent::Command { execution, .. } = &*change.event
                        && execution.thing == thing
                    {
                        let e = CommandEvent::CommandUpdated(Command(execution.clone()));
                        return Some((e, (rx, thing)));
                    }
                }
                Err(RecvError::Lagged(skipped)) => {
                    let lagged = Lagged {
                        skipped,
                        resume_from_version: None,
                        thing_id: Some(ID(thing.to_string())),
                    };
                    return Some((CommandEvent::Lagged(lagged), (rx, thing)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    stream::once(async { subscribed }).chain(live)
}
