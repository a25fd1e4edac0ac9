//! The thing subscriptions: `thingChanged`, `thingsChanged`, `connectivityChanged` and
//! `telemetryReceived`, fed by the fleet's change pipeline. A filter looks at each twin as it was right after
//! its change, however late the subscriber reads.

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Context, Enum, ID, Json, SimpleObject, Subscription, Union};
use serde_json::{Map, Value};
use tokio::sync::broadcast::Receiver;
use twin_actors::Change;
use twin_model::{ChangeOp, DeviceId, ShadowChange, TwinEvent};

use crate::auth::Role;
use crate::error::ApiResult;
use crate::schema::{
    DateTime, Lagged, RoleGuard, Subscribed, api, lagging, parse_filter, thing_id,
};
use crate::things::view;

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
    TelemetryReceived(TelemetryReceived),
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

/// A telemetry reading a device sent, once it was kept.
#[derive(SimpleObject)]
pub struct TelemetryReceived {
    pub thing_id: ID,
    /// The topic it came on.
    pub topic: String,
    /// The reading's type, from the topic (`dt/<application>/<thing>/<type>`), when the
    /// topic pattern names one.
    #[graphql(name = "type")]
    pub kind: Option<String>,
    /// The values as the device sent them, nested objects included.
    pub values: Json<Map<String, Value>>,
    /// When the reading was taken: the device's `timestamp`, or when it arrived.
    pub at: DateTime,
    /// The twin's version (telemetry does not change it).
    pub version: u64,
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

/// What a change did, and the state its update wrote: `{"desired": ..., "reported": ...}`
/// (null for a delete).
pub(crate) fn change_state(change: &ShadowChange) -> (ShadowOperation, Option<Json<Value>>) {
    match &change.op {
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
    }
}

/// When a change was accepted (to the second for changes stored before it was recorded
/// to the millisecond).
pub(crate) fn accepted_at(change: &ShadowChange) -> DateTime {
    DateTime(if change.at > 0 {
        change.at
    } else {
        change.timestamp * 1000
    })
}

/// A shadow, connectivity or telemetry event as the thing subscriptions show it
/// (commands have their own subscription).
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
            let (operation, state) = change_state(change);
            ThingEvent::ShadowChanged(ShadowChanged {
                thing_id: ID(thing.to_string()),
                shadow: shadow.name().map(str::to_owned),
                operation,
                version: *version,
                shadow_version: change.version,
                state,
                delta: current.delta().map(Json),
                client_token: change.client_token.clone(),
                at: accepted_at(change),
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
        TwinEvent::Telemetry {
            thing,
            topic,
            kind,
            values,
            at,
            version,
            ..
        } => ThingEvent::TelemetryReceived(TelemetryReceived {
            thing_id: ID(thing.to_string()),
            topic: topic.clone(),
            kind: kind.clone(),
            values: Json((**values).clone()),
            at: DateTime(*at),
            version: *version,
        }),
        TwinEvent::Command { .. } | TwinEvent::Job { .. } => return None,
    })
}

/// The fleet's events from `rx` that `select` keeps, with a `Lagged` event wherever
/// the subscriber fell behind. `watched` is the one thing of `thingChanged` and its
/// version when the subscription started.
fn events<F>(
    rx: Receiver<Change>,
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
    let live = lagging(rx).scan(watched, move |watched, change| {
        let shown = match change {
            Ok(change) => to_graphql(&change.event)
                .filter(|_| select(&change))
                .inspect(|_| {
                    if let Some((_, seen)) = watched {
                        *seen = change.event.version();
                    }
                }),
            Err(skipped) => Some(ThingEvent::Lagged(Lagged {
                skipped,
                resume_from_version: watched.as_ref().map(|(_, v)| v + 1),
                thing_id: watched.as_ref().map(|(t, _)| ID(t.to_string())),
            })),
        };
        std::future::ready(Some(shown))
    });
    stream::once(async { subscribed }).chain(live.filter_map(std::future::ready))
}

#[derive(Default)]
pub struct ThingsSubscription;

#[Subscription]
impl ThingsSubscription {
    /// Every shadow and connectivity change of one thing.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn thing_changed(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        let api = api(ctx);
        let thing = thing_id(&id)?;
        // Subscribe first, then read the version: no change can fall between the two.
        let rx = api.fleet.queries().subscribe();
        let version = view(&api.fleet, &thing)?.0.version();
        let watched = Some((thing.clone(), version));
        Ok(events(rx, watched, move |c| c.event.thing() == &thing))
    }

    /// Shadow and connectivity changes of every thing matching `filter` after the change.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn things_changed(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        let rx = api(ctx).fleet.queries().subscribe();
        Ok(fleet_events(rx, filter.as_deref(), |_| true)?)
    }

    /// Connects and disconnects of every thing matching `filter`.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn connectivity_changed(
        &self,
        ctx: &Context<'_>,
        filter: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        let rx = api(ctx).fleet.queries().subscribe();
        Ok(fleet_events(rx, filter.as_deref(), |e| {
            matches!(e, TwinEvent::Connectivity { .. })
        })?)
    }

    /// Telemetry readings, once kept: of the thing `id`, or of every thing matching
    /// `filter` right after the reading (all things without either). Readings come as
    /// fast as devices send them; a subscriber that falls behind gets `Lagged`.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn telemetry_received(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
        filter: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = ThingEvent> + use<>> {
        let thing = id.as_ref().map(thing_id).transpose()?;
        let rx = api(ctx).fleet.queries().subscribe_telemetry();
        Ok(fleet_events(rx, filter.as_deref(), move |e| {
            thing.as_ref().is_none_or(|t| e.thing() == t)
        })?)
    }
}

/// The events of `rx` that `kind` keeps, of every thing matching `filter` (all things
/// without one).
fn fleet_events<K>(
    rx: Receiver<Change>,
    filter: Option<&str>,
    kind: K,
) -> ApiResult<impl Stream<Item = ThingEvent> + use<K>>
where
    K: Fn(&TwinEvent) -> bool + Send + 'static,
{
    let filter = parse_filter(filter)?;
    // The filter sees each twin as it was right after its change, however late the
    // subscriber reads.
    Ok(events(rx, None, move |c| {
        kind(&c.event)
            && filter
                .as_ref()
                .is_none_or(|f| c.view.as_ref().is_some_and(|v| f.matches(&**v)))
    }))
}
