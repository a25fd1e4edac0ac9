//! Commands in the schema: the execution type, its connection and its event stream.

use std::sync::Arc;

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Context, Enum, ID, Json, Object, SimpleObject, Subscription, Union};
use serde_json::{Map, Value};
use tokio::sync::broadcast::Receiver;
use twin_actors::Change;
use twin_model::command::{self, CommandExecution, NewCommand};
use twin_model::{DeviceId, TwinEvent, json};

use crate::auth::Role;
use crate::error::{ApiError, Code};
use crate::schema::{self, DateTime, Lagged, PageInfo, RoleGuard, Subscribed, api, lagging};

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
    let live = lagging(rx).filter_map(move |change| {
        let event = match change {
            Ok(change) => match &*change.event {
                TwinEvent::Command { execution, .. } if execution.thing == thing => {
                    Some(CommandEvent::CommandUpdated(Command(execution.clone())))
                }
                _ => None,
            },
            Err(skipped) => Some(CommandEvent::Lagged(Lagged {
                skipped,
                resume_from_version: None,
                thing_id: Some(ID(thing.to_string())),
            })),
        };
        std::future::ready(event)
    });
    stream::once(async { subscribed }).chain(live)
}

#[derive(Default)]
pub struct CommandsQuery;

#[Object]
impl CommandsQuery {
    /// A command execution by id, its deadlines applied; null when there is none.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn command(
        &self,
        ctx: &Context<'_>,
        execution_id: ID,
    ) -> async_graphql::Result<Option<Command>> {
        let api = api(ctx);
        if !twin_model::topic::valid_execution_id(&execution_id) {
            return Ok(None);
        }
        match api.fleet.commands().get(&execution_id).await {
            Ok(c) => Ok(Some(Command(c))),
            Err(e) if e.kind() == twin_model::RejectionKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::from(e).into()),
        }
    }

    /// A thing's command executions, newest first.
    #[graphql(
        guard = "RoleGuard(Role::Viewer)",
        complexity = "(first.max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn commands(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<CommandConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        let thing = schema::thing_id(&thing_id)?;
        let mut list = api
            .fleet
            .commands()
            .list(&thing, after, first + 1)
            .await
            .map_err(ApiError::from)?;
        let has_next_page = list.len() > first;
        list.truncate(first);
        let edges: Vec<CommandEdge> = list
            .into_iter()
            .map(|c| CommandEdge {
                cursor: c.execution_id.clone(),
                node: Command(Arc::new(c)),
            })
            .collect();
        Ok(CommandConnection {
            page_info: PageInfo {
                has_next_page,
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }
}

#[derive(Default)]
pub struct CommandsMutation;

#[Object]
impl CommandsMutation {
    /// Sends a command to a thing (operator). The device receives `payload` on
    /// `$aws/commands/things/{thing}/executions/{executionId}/request/json` once it
    /// subscribes there; undelivered after `expiresInSeconds`, or unfinished
    /// `timeoutSeconds` after delivery, the command times out.
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn send_command(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        name: String,
        payload: Option<Json<Value>>,
        #[graphql(desc = "Default 60.")] timeout_seconds: Option<u64>,
        #[graphql(desc = "Default 3600.")] expires_in_seconds: Option<u64>,
    ) -> async_graphql::Result<Command> {
        let api = api(ctx);
        let thing = schema::thing_id(&thing_id)?;
        let request = NewCommand {
            name,
            payload: payload.map_or(Value::Object(Map::new()), |p| p.0),
            timeout_seconds: timeout_seconds.unwrap_or(60),
            expires_in_seconds: expires_in_seconds.unwrap_or(3600),
        };
        if json::encoded_len(&request.payload) > api.fleet.config().limits.max_state_bytes {
            return Err(ApiError::new(
                Code::PayloadTooLarge,
                format!(
                    "the payload is larger than {} bytes",
                    api.fleet.config().limits.max_state_bytes
                ),
            )
            .into());
        }
        let execution = api
            .fleet
            .commands()
            .send(&thing, request)
            .await
            .map_err(ApiError::from)?;
        Ok(Command(execution))
    }
}

#[derive(Default)]
pub struct CommandsSubscription;

#[Subscription]
impl CommandsSubscription {
    /// Every change of a thing's command executions (created, delivered, answered,
    /// timed out).
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn command_updated(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = CommandEvent> + use<>> {
        let api = api(ctx);
        let thing = schema::thing_id(&thing_id)?;
        Ok(updates(api.fleet.queries().subscribe(), thing))
    }
}
