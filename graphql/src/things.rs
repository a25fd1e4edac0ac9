//! Things in the schema: a thing with its twin and shadows, the fleet query, the registry
//! mutations (admin) and steering desired state (operator).

use std::sync::Arc;

use async_graphql::{Context, ID, Json, Object, SimpleObject};
use serde_json::{Map, Value, json};
use twin_actors::telemetry::{Caller, shadow_request};
use twin_actors::{FleetHandle, RegistryOp, ShadowView, TwinView};
use twin_model::topic::ShadowOp;
use twin_model::{DeviceId, ShadowName, UpdateRequest};

use crate::auth::Role;
use crate::certificates::{self, Certificate};
use crate::error::{ApiError, ApiResult, Code};
use crate::history::{self, ShadowHistoryConnection};
use crate::schema::{
    DateTime, PageInfo, RoleGuard, api, caller, parse_filter, shadow_name, thing_id,
};

/// A registered thing (device) and its twin.
pub struct Thing(pub(crate) Arc<TwinView>);

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
    /// With `at`, the shadow as it was at that instant, from its retained history (null
    /// when it did not exist then); an instant older than the history reaches is
    /// `INVALID_ARGUMENT`, naming the oldest instant available.
    async fn shadow(
        &self,
        ctx: &Context<'_>,
        name: Option<String>,
        at: Option<DateTime>,
    ) -> async_graphql::Result<Option<Shadow>> {
        let name = shadow_name(name.as_deref())?;
        let thing = self.0.id();
        let Some(at) = at else {
            return Ok(self.0.shadow(&name).map(|v| Shadow::new(thing, name, v)));
        };
        let then = history::shadow_at(&api(ctx).fleet, thing, &name, at).await?;
        Ok(then.map(|v| Shadow::new(thing, name, &v)))
    }

    /// The certificates that may log in as this thing (admin).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn certificates(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Certificate>> {
        Ok(certificates::attached(ctx, &self.0.record.certificates).await?)
    }

    /// Every existing shadow, the classic one first.
    async fn shadows(&self) -> Vec<Shadow> {
        self.0
            .shadows()
            .map(|(n, v)| Shadow::new(self.0.id(), n.clone(), v))
            .collect()
    }

    /// The latest value of each telemetry key the device sent, by key (nested values
    /// have dotted keys: `gps.lat`).
    async fn telemetry(&self) -> Vec<TelemetryValue> {
        self.0
            .telemetry
            .iter()
            .map(|(key, sample)| TelemetryValue {
                key: key.to_owned(),
                value: Json(sample.value.clone()),
                timestamp: DateTime(sample.at),
            })
            .collect()
    }

    /// The numeric readings of telemetry `key` from `since` to `until` (default: now), in
    /// buckets of `step` seconds (at most 10,000 buckets), each with its count, minimum,
    /// maximum and average (null when empty). Readings are kept for `telemetry_retention`.
    async fn telemetry_series(
        &self,
        ctx: &Context<'_>,
        key: String,
        since: DateTime,
        until: Option<DateTime>,
        step: u64,
    ) -> ApiResult<Vec<TelemetryBucket>> {
        let fleet = &api(ctx).fleet;
        let until = until.map_or_else(|| fleet.now_millis() + 1, |u| u.0);
        let series = twin_model::telemetry::Series::new(since.0, until, step.saturating_mul(1000))
            .map_err(ApiError::invalid)?;
        let series = fleet.telemetry().series(self.0.id(), &key, series).await?;
        Ok(series
            .buckets()
            .into_iter()
            .map(|b| TelemetryBucket {
                start: DateTime(b.start),
                count: b.count,
                min: (b.count > 0).then_some(b.min),
                max: (b.count > 0).then_some(b.max),
                avg: b.avg(),
            })
            .collect())
    }
}

/// The latest value of one telemetry key.
#[derive(SimpleObject)]
pub struct TelemetryValue {
    /// Dotted for nested values (`gps.lat`).
    pub key: String,
    pub value: Json<Value>,
    /// When it was read: the device's `timestamp`, or when it was received.
    pub timestamp: DateTime,
}

/// The readings of a telemetry key in one time bucket.
#[derive(SimpleObject)]
pub struct TelemetryBucket {
    /// The bucket covers `start` ≤ t < `start` + step.
    pub start: DateTime,
    pub count: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
}

/// The device's presence as the platform last saw it.
#[derive(SimpleObject)]
pub struct Connectivity {
    pub connected: bool,
    /// When `connected` last changed.
    pub since: Option<DateTime>,
    /// When the device was last heard from (connect, disconnect, reported state or
    /// telemetry).
    pub last_seen: Option<DateTime>,
    pub disconnect_reason: Option<String>,
}

/// A device shadow, with AWS IoT Device Shadow semantics.
pub struct Shadow {
    thing: DeviceId,
    name: ShadowName,
    view: ShadowView,
}

impl Shadow {
    fn new(thing: &DeviceId, name: ShadowName, view: &ShadowView) -> Self {
        Self {
            thing: thing.clone(),
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

    /// The shadow's retained changes, newest first, with who made each one; `since` and
    /// `until` bound when they were accepted. Kept: the newest `history_per_shadow`
    /// changes, none older than `history_retention`.
    #[graphql(complexity = "(first.max(1) as usize).saturating_mul(child_complexity)")]
    async fn history(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
        since: Option<DateTime>,
        until: Option<DateTime>,
    ) -> async_graphql::Result<ShadowHistoryConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        Ok(history::page(
            &api.fleet,
            &self.thing,
            &self.name,
            first,
            after.as_deref(),
            since,
            until,
        )
        .await?)
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

/// The view of a thing that was just changed (it can only be gone if deleted meanwhile).
pub(crate) fn view(fleet: &FleetHandle, id: &DeviceId) -> ApiResult<Thing> {
    fleet
        .queries()
        .thing(id)
        .map(Thing)
        .ok_or_else(|| ApiError::not_found(format!("thing {id} is not registered")))
}

#[derive(Default)]
pub struct ThingsQuery;

#[Object]
impl ThingsQuery {
    /// A thing by id; null when it is not registered.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Thing>> {
        let api = api(ctx);
        Ok(api.fleet.queries().thing(&thing_id(&id)?).map(Thing))
    }

    /// Registered things in id order, optionally filtered, e.g.
    /// `reported.temp > 30 AND attributes.site = "plant-7" AND connected = true`.
    #[graphql(
        guard = "RoleGuard(Role::Viewer)",
        complexity = "(first.max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn things(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<ThingConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        let filter = parse_filter(filter.as_deref())?;
        let after = after
            .map(|a| DeviceId::parse(&a))
            .transpose()
            .map_err(|_| ApiError::invalid("after is not a cursor of this connection"))?;
        let page = api
            .fleet
            .queries()
            .query(filter.as_ref(), after.as_ref(), first);
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
}

#[derive(Default)]
pub struct ThingsMutation;

impl ThingsMutation {
    async fn registry(
        ctx: &Context<'_>,
        id: &ID,
        op: RegistryOp,
    ) -> ApiResult<(Thing, Option<String>)> {
        let api = api(ctx);
        let thing = thing_id(id)?;
        let secret = api.fleet.registry().apply(&thing, op).await?;
        Ok((view(&api.fleet, &thing)?, secret))
    }

    fn with_secret((thing, secret): (Thing, Option<String>)) -> ApiResult<ThingSecret> {
        let secret = secret.ok_or_else(|| ApiError::new(Code::Internal, "no secret was made"))?;
        Ok(ThingSecret { thing, secret })
    }
}

#[Object]
impl ThingsMutation {
    /// Registers a thing (admin). The answer holds its device secret, shown once.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
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
    #[graphql(guard = "RoleGuard(Role::Admin)")]
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
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn update_desired(
        &self,
        ctx: &Context<'_>,
        id: ID,
        shadow: Option<String>,
        desired: Json<Value>,
        expected_version: Option<u64>,
        client_token: Option<String>,
    ) -> async_graphql::Result<Shadow> {
        let api = api(ctx);
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
            .inspect_err(|r| shadow_request(Caller::ApiToken, ShadowOp::Update, r.code()))
            .map_err(ApiError::from)?;
        api.fleet
            .shadows()
            .update(&thing, name.clone(), request, caller(ctx).origin())
            .await
            .map_err(ApiError::from)?;
        let view = view(&api.fleet, &thing)?;
        let shadow = view
            .0
            .shadow(&name)
            .ok_or_else(|| ApiError::not_found("the shadow was deleted meanwhile"))?;
        Ok(Shadow::new(&thing, name, shadow))
    }

    /// Deletes a shadow (operator); it keeps its version.
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn delete_shadow(
        &self,
        ctx: &Context<'_>,
        id: ID,
        shadow: Option<String>,
    ) -> async_graphql::Result<DeletedShadow> {
        let api = api(ctx);
        let thing = thing_id(&id)?;
        let name = shadow_name(shadow.as_deref())?;
        let change = api
            .fleet
            .shadows()
            .delete(&thing, name.clone(), None, caller(ctx).origin())
            .await
            .map_err(ApiError::from)?;
        Ok(DeletedShadow {
            thing_id: id,
            shadow: name.name().map(str::to_owned),
            version: change.version,
        })
    }

    /// Deletes a thing with its shadows and history (admin); ends its connection.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn delete_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<ID> {
        let api = api(ctx);
        let thing = thing_id(&id)?;
        api.fleet
            .registry()
            .apply(&thing, RegistryOp::Delete)
            .await
            .map_err(ApiError::from)?;
        Ok(id)
    }

    /// Disables a thing (admin): its live connection ends and reconnects are refused.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn disable_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Thing> {
        Ok(Self::registry(ctx, &id, RegistryOp::SetEnabled(false))
            .await?
            .0)
    }

    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn enable_thing(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Thing> {
        Ok(Self::registry(ctx, &id, RegistryOp::SetEnabled(true))
            .await?
            .0)
    }

    /// A new device secret (admin); the old one stops working and the live connection ends.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn rotate_thing_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<ThingSecret> {
        Ok(Self::with_secret(
            Self::registry(ctx, &id, RegistryOp::RotateSecret).await?,
        )?)
    }
}
