//! The GraphQL schema: types, queries, mutations and subscriptions.

use std::sync::Arc;

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{
    Context, Enum, ID, InputValueError, InputValueResult, Json, Object, Scalar, ScalarType,
    SimpleObject, Subscription, Union, Value as GqlValue,
};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use twin_actors::{Change, FleetHandle, RegistryOp, ShadowView, TwinView};
use twin_model::command::NewCommand;
use twin_model::{ChangeOp, DeviceId, Filter, ShadowName, TwinEvent, UpdateRequest, json};

use crate::auth::{Principal, Role, Tokens};
use crate::commands::{self, Command, CommandConnection, CommandEdge, CommandEvent};
use crate::error::{ApiError, ApiResult, Code};
use crate::jobs::{
    self, NewJob, OtaDocument, OtaExecutions, OtaJob, OtaJobEvent, OtaRollout, OtaTargets,
};

/// What every resolver shares.
pub struct Api {
    pub fleet: FleetHandle,
    pub tokens: Arc<Tokens>,
    pub limits: ApiLimits,
    /// Signs job documents.
    pub signer: Arc<crate::Signer>,
}

/// Limits on what one request may ask.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest `first` of a page.
    pub max_page_size: usize,
    pub max_depth: usize,
    pub max_complexity: usize,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_page_size: 100,
            max_depth: 12,
            max_complexity: 5000,
            max_body_bytes: 1 << 20,
        }
    }
}

fn api<'a>(ctx: &Context<'a>) -> &'a Api {
    ctx.data_unchecked::<Api>()
}

/// The fleet, once the caller has at least `role`.
fn allowed<'a>(ctx: &Context<'a>, role: Role) -> ApiResult<&'a Api> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| ApiError::new(Code::Unauthenticated, "a bearer token is required"))?
        .require(role)?;
    Ok(api(ctx))
}

fn thing_id(id: &ID) -> ApiResult<DeviceId> {
    Ok(DeviceId::parse(id.as_str())?)
}

fn shadow_name(name: Option<&str>) -> ApiResult<ShadowName> {
    Ok(match name {
        None | Some("") => ShadowName::classic(),
        Some(n) => ShadowName::named(n)?,
    })
}

pub(crate) fn parse_filter(filter: Option<&str>) -> ApiResult<Option<Filter>> {
    filter
        .filter(|f| !f.trim().is_empty())
        .map(Filter::parse)
        .transpose()
        .map_err(ApiError::from)
}

/// The view of a thing that was just changed (it can only be gone if deleted meanwhile).
fn view(fleet: &FleetHandle, id: &DeviceId) -> ApiResult<Thing> {
    fleet
        .thing(id)
        .map(Thing)
        .ok_or_else(|| ApiError::not_found(format!("thing {id} is not registered")))
}

/// An RFC 3339 UTC timestamp, such as `2026-11-23T08:21:00.123Z`.
#[derive(Debug, Clone, Copy)]
pub struct DateTime(pub u64);

#[Scalar(name = "DateTime")]
impl ScalarType for DateTime {
    fn parse(value: GqlValue) -> InputValueResult<Self> {
        Err(InputValueError::custom(format!(
            "DateTime is output only, got {value}"
        )))
    }

    fn to_value(&self) -> GqlValue {
        GqlValue::String(twin_model::rfc3339(self.0))
    }
}

/// A registered thing (device) and its twin.
pub struct Thing(Arc<TwinView>);

#[Object]
impl Thing {
    async fn id(&self) -> ID {
        ID(self.0.id().to_string())
    }

    /// The registry's free-form description (site, model, owner...).
    async fn attributes(&self) -> Json<&Map<String, Value>> {
        Json(&self.0.record.attributes)
    }

    /// A disabled thing cannot connect.
    async fn enabled(&self) -> bool {
        self.0.record.enabled
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.record.created_at)
    }

    /// The twin's version: the sum of its shadows' versions, +1 per accepted update.
    async fn version(&self) -> u64 {
        self.0.version()
    }

    async fn connectivity(&self) -> Connectivity {
        let c = &self.0.connectivity;
        Connectivity {
            connected: c.connected,
            since: (c.since > 0).then_some(DateTime(c.since)),
            last_seen: (self.0.last_seen > 0).then_some(DateTime(self.0.last_seen)),
            disconnect_reason: c.disconnect_reason.clone(),
        }
    }

    /// A shadow by name (the classic shadow without one); null when it does not exist.
    async fn shadow(&self, name: Option<String>) -> async_graphql::Result<Option<Shadow>> {
        let name = shadow_name(name.as_deref())?;
        Ok(self.0.shadow(&name).map(|v| Shadow::new(name, v)))
    }

    /// Every existing shadow, the classic one first.
    async fn shadows(&self) -> Vec<Shadow> {
        self.0
            .shadows()
            .map(|(n, v)| Shadow::new(n.clone(), v))
            .collect()
    }
}

/// The device's presence as the platform last saw it.
#[derive(SimpleObject)]
pub struct Connectivity {
    pub connected: bool,
    /// When `connected` last changed.
    pub since: Option<DateTime>,
    /// When the device was last heard from (connect, disconnect or reported state).
    pub last_seen: Option<DateTime>,
    pub disconnect_reason: Option<String>,
}

/// A device shadow, with AWS IoT Device Shadow semantics.
pub struct Shadow {
    name: ShadowName,
    view: ShadowView,
}

impl Shadow {
    fn new(name: ShadowName, view: &ShadowView) -> Self {
        Self {
            name,
            view: view.clone(),
        }
    }
}

#[Object]
impl Shadow {
    /// Null for the classic (unnamed) shadow.
    async fn name(&self) -> Option<&str> {
        self.name.name()
    }

    async fn desired(&self) -> Option<Json<&Map<String, Value>>> {
        self.view.shadow.desired.as_ref().map(Json)
    }

    async fn reported(&self) -> Option<Json<&Map<String, Value>>> {
        self.view.shadow.reported.as_ref().map(Json)
    }

    /// Every desired leaf that differs from reported; null when in sync.
    async fn delta(&self) -> Option<Json<&Map<String, Value>>> {
        self.view.delta.as_ref().map(Json)
    }

    /// `{"desired": ..., "reported": ...}` with a `{"timestamp": seconds}` per leaf.
    async fn metadata(&self) -> Json<Value> {
        let s = &self.view.shadow;
        let mut m = Map::new();
        if let Some(d) = &s.metadata_desired {
            m.insert("desired".into(), Value::Object(d.clone()));
        }
        if let Some(r) = &s.metadata_reported {
            m.insert("reported".into(), Value::Object(r.clone()));
        }
        Json(Value::Object(m))
    }

    /// +1 per accepted update; kept across a delete.
    async fn version(&self) -> u64 {
        self.view.shadow.version
    }

    async fn updated_at(&self) -> DateTime {
        DateTime(self.view.shadow.timestamp * 1000)
    }
}

#[derive(SimpleObject)]
pub struct ThingConnection {
    /// Things matching the filter, on all pages.
    pub total_count: u64,
    pub edges: Vec<ThingEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct ThingEdge {
    /// Opaque; pass as `after` to continue after this thing.
    pub cursor: String,
    pub node: Thing,
}

#[derive(SimpleObject)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

pub struct Query;

#[Object]
impl Query {
    /// A thing by id; null when it is not registered.
    async fn thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Thing>> {
        let api = allowed(ctx, Role::Viewer)?;
        Ok(api.fleet.thing(&thing_id(&id)?).map(Thing))
    }

    /// Registered things in id order, optionally filtered, e.g.
    /// `reported.temp > 30 AND attributes.site = "plant-7" AND connected = true`.
    #[graphql(complexity = "(first.max(1) as usize).saturating_mul(child_complexity)")]
    async fn things(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<ThingConnection> {
        let api = allowed(ctx, Role::Viewer)?;
        let max = api.limits.max_page_size;
        if first < 1 || first as usize > max {
            return Err(ApiError::invalid(format!("first must be between 1 and {max}")).into());
        }
        let filter = parse_filter(filter.as_deref())?;
        let after = after
            .map(|a| DeviceId::parse(&a))
            .transpose()
            .map_err(|_| ApiError::invalid("after is not a cursor of this connection"))?;
        let page = api
            .fleet
            .query(filter.as_ref(), after.as_ref(), first as usize);
        let edges: Vec<ThingEdge> = page
            .items
            .into_iter()
            .map(|v| ThingEdge {
                cursor: v.id().to_string(),
                node: Thing(v),
            })
            .collect();
        Ok(ThingConnection {
            total_count: page.total as u64,
            page_info: PageInfo {
                has_next_page: page.has_next,
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }

    /// The Ed25519 public key (hex) that verifies job documents' `signature`.
    async fn signing_key(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        Ok(allowed(ctx, Role::Viewer)?.signer.public_key())
    }

    /// OTA jobs in id order, with their counts.
    async fn ota_jobs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<Vec<OtaJob>> {
        let api = allowed(ctx, Role::Viewer)?;
        let max = api.limits.max_page_size;
        if first < 1 || first as usize > max {
            return Err(ApiError::invalid(format!("first must be between 1 and {max}")).into());
        }
        Ok(jobs::list(&api.fleet, after, first as usize).await?)
    }

    /// An OTA job and its executions per status; null when there is none.
    async fn ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
    ) -> async_graphql::Result<Option<OtaJob>> {
        let api = allowed(ctx, Role::Viewer)?;
        if !twin_model::topic::valid_job_id(&job_id) {
            return Ok(None);
        }
        Ok(jobs::progress(&api.fleet, &job_id).await?)
    }

    /// A command execution by id, its deadlines applied; null when there is none.
    async fn command(
        &self,
        ctx: &Context<'_>,
        execution_id: ID,
    ) -> async_graphql::Result<Option<Command>> {
        let api = allowed(ctx, Role::Viewer)?;
        if !twin_model::topic::valid_execution_id(&execution_id) {
            return Ok(None);
        }
        match api.fleet.command(&execution_id).await {
            Ok(c) => Ok(Some(Command(c))),
            Err(e) if e.kind() == twin_model::RejectionKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::from(e).into()),
        }
    }

    /// A thing's command executions, newest first.
    #[graphql(complexity = "(first.max(1) as usize).saturating_mul(child_complexity)")]
    async fn commands(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<CommandConnection> {
        let api = allowed(ctx, Role::Viewer)?;
        let max = api.limits.max_page_size;
        if first < 1 || first as usize > max {
            return Err(ApiError::invalid(format!("first must be between 1 and {max}")).into());
        }
        let thing = self::thing_id(&thing_id)?;
        let mut list = api
            .fleet
            .commands(&thing, after, first as usize + 1)
            .await
            .map_err(ApiError::from)?;
        let has_next_page = list.len() > first as usize;
        list.truncate(first as usize);
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

/// A thing and its device secret, which is shown only here, once.
#[derive(SimpleObject)]
pub struct ThingSecret {
    pub thing: Thing,
    /// The device's MQTT password. Not stored: it cannot be shown again.
    pub secret: String,
}

#[derive(SimpleObject)]
pub struct DeletedShadow {
    pub thing_id: ID,
    pub shadow: Option<String>,
    /// The version the deleted shadow keeps (the next update makes version + 1).
    pub version: u64,
}

#[derive(SimpleObject)]
pub struct CreatedToken {
    /// The bearer token, shown only here, once.
    pub token: String,
    pub role: Role,
    pub expires_at: Option<DateTime>,
}

pub struct Mutation;

impl Mutation {
    async fn registry(
        ctx: &Context<'_>,
        id: &ID,
        op: RegistryOp,
    ) -> ApiResult<(Thing, Option<String>)> {
        let api = allowed(ctx, Role::Admin)?;
        let thing = thing_id(id)?;
        let secret = api.fleet.registry(&thing, op).await?;
        Ok((view(&api.fleet, &thing)?, secret))
    }

    fn with_secret((thing, secret): (Thing, Option<String>)) -> ApiResult<ThingSecret> {
        let secret = secret.ok_or_else(|| ApiError::new(Code::Internal, "no secret was made"))?;
        Ok(ThingSecret { thing, secret })
    }
}

#[Object]
impl Mutation {
    /// Registers a thing (admin). The answer holds its device secret, shown once.
    async fn register_thing(
        &self,
        ctx: &Context<'_>,
        id: ID,
        attributes: Option<Json<Map<String, Value>>>,
    ) -> async_graphql::Result<ThingSecret> {
        let op = RegistryOp::Register(attributes.map(|a| a.0).unwrap_or_default());
        Ok(Self::with_secret(Self::registry(ctx, &id, op).await?)?)
    }

    /// Merges into a thing's attributes (admin); a `null` value deletes an attribute.
    async fn update_thing_attributes(
        &self,
        ctx: &Context<'_>,
        id: ID,
        attributes: Json<Map<String, Value>>,
    ) -> async_graphql::Result<Thing> {
        let op = RegistryOp::MergeAttributes(attributes.0);
        Ok(Self::registry(ctx, &id, op).await?.0)
    }

    /// Merges into a shadow's desired state (operator), exactly like an MQTT update: a
    /// `null` deletes a key, a stale `expectedVersion` is refused, and the device gets
    /// its delta.
    async fn update_desired(
        &self,
        ctx: &Context<'_>,
        id: ID,
        shadow: Option<String>,
        desired: Json<Value>,
        expected_version: Option<u64>,
        client_token: Option<String>,
    ) -> async_graphql::Result<Shadow> {
        let api = allowed(ctx, Role::Operator)?;
        let thing = thing_id(&id)?;
        let name = shadow_name(shadow.as_deref())?;
        let mut body = json!({"state": {"desired": desired.0}});
        if let Some(v) = expected_version {
            body["version"] = v.into();
        }
        if let Some(t) = client_token {
            body["clientToken"] = t.into();
        }
        let request = UpdateRequest::parse(body.to_string().as_bytes(), &api.fleet.config().limits)
            .map_err(ApiError::from)?;
        api.fleet
            .update_shadow(&thing, name.clone(), request)
            .await
            .map_err(ApiError::from)?;
        let view = view(&api.fleet, &thing)?;
        let shadow = view
            .0
            .shadow(&name)
            .ok_or_else(|| ApiError::not_found("the shadow was deleted meanwhile"))?;
        Ok(Shadow::new(name, shadow))
    }

    /// Deletes a shadow (operator); it keeps its version.
    async fn delete_shadow(
        &self,
        ctx: &Context<'_>,
        id: ID,
        shadow: Option<String>,
    ) -> async_graphql::Result<DeletedShadow> {
        let api = allowed(ctx, Role::Operator)?;
        let thing = thing_id(&id)?;
        let name = shadow_name(shadow.as_deref())?;
        let change = api
            .fleet
            .delete_shadow(&thing, name.clone(), None)
            .await
            .map_err(ApiError::from)?;
        Ok(DeletedShadow {
            thing_id: id,
            shadow: name.name().map(str::to_owned),
            version: change.version,
        })
    }

    /// Deletes a thing with its shadows and history (admin); ends its connection.
    async fn delete_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<ID> {
        let api = allowed(ctx, Role::Admin)?;
        let thing = thing_id(&id)?;
        api.fleet
            .registry(&thing, RegistryOp::Delete)
            .await
            .map_err(ApiError::from)?;
        Ok(id)
    }

    /// Disables a thing (admin): its live connection ends and reconnects are refused.
    async fn disable_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Thing> {
        Ok(Self::registry(ctx, &id, RegistryOp::SetEnabled(false))
            .await?
            .0)
    }

    async fn enable_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Thing> {
        Ok(Self::registry(ctx, &id, RegistryOp::SetEnabled(true))
            .await?
            .0)
    }

    /// A new device secret (admin); the old one stops working and the live connection ends.
    async fn rotate_thing_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<ThingSecret> {
        Ok(Self::with_secret(
            Self::registry(ctx, &id, RegistryOp::RotateSecret).await?,
        )?)
    }

    /// Issues an API token (admin), shown once.
    async fn create_token(
        &self,
        ctx: &Context<'_>,
        role: Role,
        ttl_seconds: Option<u64>,
        note: Option<String>,
    ) -> async_graphql::Result<CreatedToken> {
        let api = allowed(ctx, Role::Admin)?;
        if ttl_seconds == Some(0) {
            return Err(ApiError::invalid("ttlSeconds must be positive").into());
        }
        let tokens = api.tokens.clone();
        let ttl = ttl_seconds.map(|s| s.saturating_mul(1000));
        let (token, record) = tokio::task::spawn_blocking(move || tokens.create(role, ttl, note))
            .await
            .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?
            .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
        Ok(CreatedToken {
            token,
            role,
            expires_at: record.expires_at.map(DateTime),
        })
    }

    /// Creates a firmware (OTA) job (operator): every target gets an execution, which
    /// its device sees on the AWS IoT Jobs topics (`notify`, `start-next`, ...): all at
    /// once, or paced by `rollout` (waves or a rate) and stopped by its abort policy.
    async fn create_ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        targets: OtaTargets,
        document: OtaDocument,
        executions: Option<OtaExecutions>,
        rollout: Option<OtaRollout>,
    ) -> async_graphql::Result<OtaJob> {
        let api = allowed(ctx, Role::Operator)?;
        let new = NewJob {
            job_id: job_id.0,
            targets,
            document,
            executions: executions.unwrap_or_default(),
            rollout: rollout.unwrap_or_default(),
        };
        Ok(jobs::create(&api.fleet, &api.signer, new, api.fleet.now_millis()).await?)
    }

    /// Pauses a paced job's rollout (operator): no new executions until resumed.
    async fn pause_ota_job(&self, ctx: &Context<'_>, job_id: ID) -> async_graphql::Result<OtaJob> {
        let api = allowed(ctx, Role::Operator)?;
        Ok(jobs::pause(&api.fleet, &job_id, true).await?)
    }

    /// Resumes a paused rollout (operator).
    async fn resume_ota_job(&self, ctx: &Context<'_>, job_id: ID) -> async_graphql::Result<OtaJob> {
        let api = allowed(ctx, Role::Operator)?;
        Ok(jobs::pause(&api.fleet, &job_id, false).await?)
    }

    /// Cancels an OTA job (operator): no execution is queued anymore and every queued one
    /// ends `CANCELED`; with `force`, in-progress ones too (their devices are told on
    /// `notify`).
    async fn cancel_ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        #[graphql(desc = "Default false.")] force: Option<bool>,
    ) -> async_graphql::Result<OtaJob> {
        let api = allowed(ctx, Role::Operator)?;
        Ok(jobs::cancel(&api.fleet, &job_id, force.unwrap_or(false)).await?)
    }

    /// Takes things out of an OTA job (operator): those without an execution yet never get
    /// one, and the others' executions end `REMOVED` (their devices are told on `notify`).
    /// An in-progress execution is removed only with `force`; without it, or when a thing
    /// is not a target of the job, nothing is changed (`VERSION_CONFLICT`, `NOT_FOUND`).
    async fn remove_ota_job_targets(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        thing_ids: Vec<ID>,
        #[graphql(desc = "Default false.")] force: Option<bool>,
    ) -> async_graphql::Result<OtaJob> {
        let api = allowed(ctx, Role::Operator)?;
        Ok(jobs::remove_targets(&api.fleet, &job_id, &thing_ids, force.unwrap_or(false)).await?)
    }

    /// Sends a command to a thing (operator). The device receives `payload` on
    /// `$aws/commands/things/{thing}/executions/{executionId}/request/json` once it
    /// subscribes there; undelivered after `expiresInSeconds`, or unfinished
    /// `timeoutSeconds` after delivery, the command times out.
    async fn send_command(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        name: String,
        payload: Option<Json<Value>>,
        #[graphql(desc = "Default 60.")] timeout_seconds: Option<u64>,
        #[graphql(desc = "Default 3600.")] expires_in_seconds: Option<u64>,
    ) -> async_graphql::Result<Command> {
        let api = allowed(ctx, Role::Operator)?;
        let thing = self::thing_id(&thing_id)?;
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
            .send_command(&thing, request)
            .await
            .map_err(ApiError::from)?;
        Ok(Command(execution))
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOperation {
    Updated,
    Deleted,
}

/// What a subscription delivers.
#[derive(Union)]
pub enum ThingEvent {
    Subscribed(Subscribed),
    ShadowChanged(ShadowChanged),
    ConnectivityChanged(ConnectivityChanged),
    Lagged(Lagged),
}

/// An accepted, durable shadow change.
#[derive(SimpleObject)]
pub struct ShadowChanged {
    pub thing_id: ID,
    /// Null for the classic shadow.
    pub shadow: Option<String>,
    pub operation: ShadowOperation,
    /// The twin's version after the change.
    pub version: u64,
    pub shadow_version: u64,
    /// What the update wrote: `{"desired": ..., "reported": ...}` (null for a delete).
    pub state: Option<Json<Value>>,
    /// The shadow's delta after the change; null when in sync.
    pub delta: Option<Json<Map<String, Value>>>,
    pub client_token: Option<String>,
    pub at: DateTime,
}

#[derive(SimpleObject)]
pub struct ConnectivityChanged {
    pub thing_id: ID,
    /// The twin's version (presence does not change it).
    pub version: u64,
    pub connected: bool,
    pub since: DateTime,
    pub disconnect_reason: Option<String>,
}

/// The first event of every subscription: from here on, every matching change is
/// delivered (or a `Lagged` event says which were not).
#[derive(SimpleObject)]
pub struct Subscribed {
    /// For `thingChanged`: the thing and its version when the subscription started.
    pub thing_id: Option<ID>,
    pub version: Option<u64>,
}

/// The subscriber fell behind and events were dropped for it: resynchronize by
/// reading the twin (`thing`) or the fleet (`things`) again. Never a silent gap.
#[derive(SimpleObject)]
pub struct Lagged {
    /// Events of the fleet stream dropped for this subscriber (not all of them
    /// necessarily about the things it watches).
    pub skipped: u64,
    /// For `thingChanged`: the first version this subscriber may have missed.
    pub resume_from_version: Option<u64>,
    pub thing_id: Option<ID>,
}

/// A shadow or connectivity event as the thing subscriptions show it (commands have
/// their own subscription).
fn to_graphql(event: &TwinEvent) -> Option<ThingEvent> {
    Some(match event {
        TwinEvent::Shadow {
            thing,
            shadow,
            change,
            current,
            version,
            ..
        } => {
            let (operation, state) = match &change.op {
                ChangeOp::Update { desired, reported } => {
                    let mut state = Map::new();
                    for (key, patch) in [("desired", desired), ("reported", reported)] {
                        if let Some(p) = patch {
                            state.insert(key.into(), serde_json::to_value(p).unwrap_or_default());
                        }
                    }
                    (ShadowOperation::Updated, Some(Json(Value::Object(state))))
                }
                ChangeOp::Delete => (ShadowOperation::Deleted, None),
            };
            ThingEvent::ShadowChanged(ShadowChanged {
                thing_id: ID(thing.to_string()),
                shadow: shadow.name().map(str::to_owned),
                operation,
                version: *version,
                shadow_version: change.version,
                state,
                delta: current.delta().map(Json),
                client_token: change.client_token.clone(),
                at: DateTime(change.timestamp * 1000),
            })
        }
        TwinEvent::Connectivity {
            thing,
            connectivity,
            version,
        } => ThingEvent::ConnectivityChanged(ConnectivityChanged {
            thing_id: ID(thing.to_string()),
            version: *version,
            connected: connectivity.connected,
            since: DateTime(connectivity.since),
            disconnect_reason: connectivity.disconnect_reason.clone(),
        }),
        TwinEvent::Command { .. } | TwinEvent::Job { .. } => return None,
    })
}

/// The fleet's events from `rx` that `select` keeps, with a `Lagged` event wherever
/// the subscriber fell behind. `watched` is the one thing of `thingChanged` and its
/// version when the subscription started.
fn events<F>(
    rx: Receiver<Change>,
    fleet: &FleetHandle,
    watched: Option<(DeviceId, u64)>,
    select: F,
) -> impl Stream<Item = ThingEvent> + use<F>
where
    F: Fn(&Change) -> bool + Send + 'static,
{
    let subscribed = ThingEvent::Subscribed(Subscribed {
        thing_id: watched.as_ref().map(|(t, _)| ID(t.to_string())),
        version: watched.as_ref().map(|(_, v)| *v),
    });
    let live = stream::unfold(
        (rx, fleet.clone(), watched, select),
        |(mut rx, fleet, mut watched, select)| async move {
            loop {
                match rx.recv().await {
                    Ok(change) => {
                        let Some(shown) = to_graphql(&change.event).filter(|_| select(&change))
                        else {
                            continue;
                        };
                        if let Some((_, seen)) = &mut watched {
                            *seen = change.event.version();
                        }
                        return Some((shown, (rx, fleet, watched, select)));
                    }
                    Err(RecvError::Lagged(skipped)) => {
                        let lagged = Lagged {
                            skipped,
                            resume_from_version: watched.as_ref().map(|(_, v)| v + 1),
                            thing_id: watched.as_ref().map(|(t, _)| ID(t.to_string())),
                        };
                        return Some((ThingEvent::Lagged(lagged), (rx, fleet, watched, select)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    stream::once(async { subscribed }).chain(live)
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every shadow and connectivity change of one thing.
    async fn thing_changed(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        let api = allowed(ctx, Role::Viewer)?;
        let thing = thing_id(&id)?;
        // Subscribe first, then read the version: no change can fall between the two.
        let rx = api.fleet.subscribe();
        let version = view(&api.fleet, &thing)?.0.version();
        let watched = Some((thing.clone(), version));
        Ok(events(rx, &api.fleet, watched, move |c| {
            c.event.thing() == &thing
        }))
    }

    /// Shadow and connectivity changes of every thing matching `filter` after the change.
    async fn things_changed(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        Ok(fleet_events(ctx, filter.as_deref(), |_| true)?)
    }

    /// Every change of a thing's command executions (created, delivered, answered,
    /// timed out).
    async fn command_updated(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = CommandEvent> + use<>> {
        let api = allowed(ctx, Role::Viewer)?;
        let thing = self::thing_id(&thing_id)?;
        Ok(commands::updates(api.fleet.subscribe(), thing))
    }

    /// An OTA job's counts now, then again after its executions change (a burst of changes
    /// gives one up-to-date job).
    async fn ota_job_progress(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = OtaJobEvent> + use<>> {
        let api = allowed(ctx, Role::Viewer)?;
        if api
            .fleet
            .job(&job_id)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::not_found(format!("no job {}", job_id.0)).into());
        }
        Ok(jobs::watch(api.fleet.clone(), job_id.0))
    }

    /// Connects and disconnects of every thing matching `filter`.
    async fn connectivity_changed(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        Ok(fleet_events(ctx, filter.as_deref(), |e| {
            matches!(e, TwinEvent::Connectivity { .. })
        })?)
    }
}

/// The events `kind` keeps of every thing matching `filter` (all things without one).
fn fleet_events(
    ctx: &Context<'_>,
    filter: Option<&str>,
    kind: fn(&TwinEvent) -> bool,
) -> ApiResult<impl Stream<Item = ThingEvent> + use<>> {
    let api = allowed(ctx, Role::Viewer)?;
    let filter = parse_filter(filter)?;
    let rx = api.fleet.subscribe();
    // The filter sees each twin as it was right after its change, however late the
    // subscriber reads.
    Ok(events(rx, &api.fleet, None, move |c| {
        kind(&c.event)
            && filter
                .as_ref()
                .is_none_or(|f| c.view.as_ref().is_some_and(|v| f.matches(&**v)))
    }))
}

pub type DoppelSchema = async_graphql::Schema<Query, Mutation, SubscriptionRoot>;

/// The schema over a running fleet.
pub fn build(api: Api) -> DoppelSchema {
    let limits = api.limits;
    async_graphql::Schema::build(Query, Mutation, SubscriptionRoot)
        .data(api)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .extension(crate::error::Coded {
            max_depth: limits.max_depth,
            max_complexity: limits.max_complexity,
        })
        .finish()
}

/// The schema's SDL (for `doppel schema` and the drift test); needs no fleet.
pub fn sdl() -> String {
    async_graphql::Schema::build(Query, Mutation, SubscriptionRoot)
        .finish()
        .sdl()
}
