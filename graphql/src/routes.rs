//! Routes in the schema (admin): create, change, pause, resume, replay and delete them,
//! rotate their signing secret, read their delivery log.

use std::time::Duration;

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Context, Enum, ID, InputObject, Object, SimpleObject, Subscription};
use twin_actors::routing::RouteTable;
use twin_actors::services::RouteSpec;
use twin_model::route;
use twin_store::routes::{DeliveryKey, DeliveryRecord, Destination, RouteRecord};

use crate::auth::Role;
use crate::error::{ApiError, ApiResult};
use crate::schema::{DateTime, PageInfo, RoleGuard, api, lagging, thing_id};

/// What a route carries.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "twin_model::route::EventType")]
pub enum EventType {
    ShadowChanged,
    ConnectivityChanged,
    Telemetry,
    CommandUpdated,
    JobExecutionUpdated,
    ThingRegistered,
    ThingUpdated,
    ThingDeleted,
}

/// Where a route's events go. Exactly one kind is given.
#[derive(InputObject)]
pub struct DestinationInput {
    pub webhook: Option<WebhookInput>,
    pub redis_stream: Option<RedisStreamInput>,
    pub kafka: Option<KafkaInput>,
}

/// A Standard Webhooks v1 endpoint: each event is POSTed, signed with the route's secret.
#[derive(InputObject)]
pub struct WebhookInput {
    /// `https://` (or `http://`) URL. Loopback, private and link-local addresses are
    /// refused unless the server's `webhook_allowed_networks` allows them.
    pub url: String,
    /// Seconds before an attempt counts as failed (1 to 60).
    #[graphql(default = 15)]
    pub timeout_seconds: i32,
}

/// A Redis stream: each event is an `XADD` entry (fields `id`, `type`, `thing`, `event`,
/// `webhook-timestamp`, `webhook-signature`).
#[derive(InputObject)]
pub struct RedisStreamInput {
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: String,
    /// The stream's key.
    pub stream: String,
    /// The stream is trimmed to about this many entries (`MAXLEN ~`), 1 to 1,000,000,000.
    #[graphql(default = 100000)]
    pub max_length: i64,
}

/// A Kafka topic: each event is a message keyed by its thing's id, produced idempotently
/// with `acks=all`.
#[derive(InputObject)]
pub struct KafkaInput {
    /// Bootstrap brokers, `host:port` comma-separated.
    pub brokers: String,
    pub topic: String,
}

fn destination(input: DestinationInput) -> ApiResult<Destination> {
    match (input.webhook, input.redis_stream, input.kafka) {
        (Some(w), None, None) => Ok(Destination::Webhook {
            url: w.url,
            timeout_secs: u32::try_from(w.timeout_seconds).unwrap_or(0),
        }),
        (None, Some(r), None) => Ok(Destination::RedisStream {
            url: r.url,
            stream: r.stream,
            max_len: u64::try_from(r.max_length).unwrap_or(0),
        }),
        (None, None, Some(k)) => Ok(Destination::Kafka {
            brokers: k.brokers,
            topic: k.topic,
        }),
        _ => Err(ApiError::invalid(
            "destination: give exactly one of webhook, redisStream and kafka",
        )),
    }
}

fn events(events: Vec<EventType>) -> Vec<route::EventType> {
    events.into_iter().map(Into::into).collect()
}

/// Whether a route delivers.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteState {
    Active,
    /// `pauseRoute`: events wait in the outbox.
    Paused,
    /// Its endpoint answered 410, or failed longer than `webhook_disable_after`: events
    /// wait until `resumeRoute`.
    Disabled,
}

/// A webhook destination as it is.
#[derive(SimpleObject)]
pub struct Webhook {
    pub url: String,
    pub timeout_seconds: i32,
}

/// A Redis Streams destination as it is.
#[derive(SimpleObject)]
pub struct RedisStream {
    /// The URL, its password (if any) replaced by `***`.
    pub url: String,
    pub stream: String,
    pub max_length: i64,
}

/// A Kafka destination as it is.
#[derive(SimpleObject)]
pub struct Kafka {
    pub brokers: String,
    pub topic: String,
}

/// A URL with its password hidden.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A route: the fleet's events of some types, filtered, to a destination.
pub struct Route(pub(crate) RouteRecord);

#[Object]
impl Route {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn events(&self) -> Vec<EventType> {
        self.0.events.iter().map(|t| (*t).into()).collect()
    }

    /// In the fleet filter language, evaluated on the thing right after each event.
    async fn filter(&self) -> Option<&str> {
        self.0.filter.as_deref()
    }

    /// The destination, when it is a webhook.
    async fn webhook(&self) -> Option<Webhook> {
        match &self.0.destination {
            Destination::Webhook { url, timeout_secs } => Some(Webhook {
                url: url.clone(),
                timeout_seconds: i32::try_from(*timeout_secs).unwrap_or(i32::MAX),
            }),
            _ => None,
        }
    }

    /// The destination, when it is a Redis stream.
    async fn redis_stream(&self) -> Option<RedisStream> {
        match &self.0.destination {
            Destination::RedisStream {
                url,
                stream,
                max_len,
            } => Some(RedisStream {
                url: redacted(url),
                stream: stream.clone(),
                max_length: i64::try_from(*max_len).unwrap_or(i64::MAX),
            }),
            _ => None,
        }
    }

    /// The destination, when it is a Kafka topic.
    async fn kafka(&self) -> Option<Kafka> {
        match &self.0.destination {
            Destination::Kafka { brokers, topic } => Some(Kafka {
                brokers: brokers.clone(),
                topic: topic.clone(),
            }),
            _ => None,
        }
    }

    async fn state(&self) -> RouteState {
        match (&self.0.disabled, self.0.paused) {
            (Some(_), _) => RouteState::Disabled,
            (None, true) => RouteState::Paused,
            (None, false) => RouteState::Active,
        }
    }

    /// Why the route was disabled.
    async fn disabled_reason(&self) -> Option<&str> {
        self.0.disabled.as_deref()
    }

    /// How its delivery is going; null until its delivery has started.
    async fn status(&self, ctx: &Context<'_>) -> Option<RouteStatus> {
        api(ctx)
            .fleet
            .routes()
            .table()
            .status(&self.0.id)
            .map(RouteStatus::from)
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }
}

/// A route and its signing secret (`whsec_…`), shown only here, once.
#[derive(SimpleObject)]
pub struct RouteWithSecret {
    pub route: Route,
    pub secret: String,
}

/// What became of an attempt.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "twin_store::routes::DeliveryStatus")]
pub enum DeliveryStatus {
    /// The destination answered 2xx.
    Delivered,
    /// It failed; the event is tried again.
    Retrying,
    /// It failed at the last retry: the event was given up.
    Failed,
}

/// One delivery attempt of one event.
pub struct Delivery(DeliveryRecord);

#[Object]
impl Delivery {
    /// The event's id (`webhook-id`), the same at every attempt.
    async fn event_id(&self) -> String {
        route::event_id(self.0.position)
    }

    async fn thing_id(&self) -> ID {
        ID(self.0.thing.to_string())
    }

    /// The thing's event number.
    async fn seq(&self) -> u64 {
        self.0.seq
    }

    async fn event_type(&self) -> EventType {
        self.0.kind.into()
    }

    /// 1 for the first attempt.
    async fn attempt(&self) -> u32 {
        self.0.attempt
    }

    /// When the attempt ended.
    async fn at(&self) -> DateTime {
        DateTime(self.0.at)
    }

    async fn status(&self) -> DeliveryStatus {
        self.0.status.into()
    }

    async fn http_status(&self) -> Option<u16> {
        self.0.http_status
    }

    /// What went wrong before any answer (cannot connect, timed out, refused address).
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }

    async fn latency_ms(&self) -> u64 {
        self.0.latency_ms
    }

    /// The start of the response body.
    async fn response(&self) -> Option<&str> {
        self.0.response.as_deref()
    }
}

#[derive(SimpleObject)]
pub struct DeliveryEdge {
    /// Opaque; pass as `after` to continue after this attempt.
    pub cursor: String,
    pub node: Delivery,
}

#[derive(SimpleObject)]
pub struct DeliveryConnection {
    pub edges: Vec<DeliveryEdge>,
    pub page_info: PageInfo,
}

fn cursor_of(key: DeliveryKey) -> String {
    crate::signing::hex(&key.to_bytes())
}

fn parse_cursor(s: &str) -> ApiResult<DeliveryKey> {
    let bad = || ApiError::invalid("after is not a cursor of this connection");
    if s.len() != 40 || !s.is_ascii() {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..20)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    DeliveryKey::from_bytes(&bytes).ok_or_else(bad)
}

fn route_id(ctx: &Context<'_>, id: &ID) -> ApiResult<RouteRecord> {
    api(ctx)
        .fleet
        .routes()
        .get(id)
        .ok_or_else(|| ApiError::new(crate::error::Code::NotFound, format!("no route {}", id.0)))
}

#[derive(Default)]
pub struct RoutesQuery;

#[Object]
impl RoutesQuery {
    /// Every route, oldest first (admin).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn routes(&self, ctx: &Context<'_>) -> Vec<Route> {
        api(ctx)
            .fleet
            .routes()
            .list()
            .into_iter()
            .map(Route)
            .collect()
    }

    /// A route by id; null when there is none.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn route(&self, ctx: &Context<'_>, id: ID) -> Option<Route> {
        api(ctx).fleet.routes().get(&id).map(Route)
    }

    /// A route's delivery log, newest attempt first, optionally only attempts of one
    /// `status` or of one thing. Kept for `route_retention` (7 days by default).
    #[graphql(
        guard = "RoleGuard(Role::Admin)",
        complexity = "(first.max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn route_deliveries(
        &self,
        ctx: &Context<'_>,
        route: ID,
        status: Option<DeliveryStatus>,
        thing_id: Option<ID>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<DeliveryConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        let route = route_id(ctx, &route)?;
        let thing = thing_id.map(|t| self::thing_id(&t)).transpose()?;
        let mut before = after.as_deref().map(parse_cursor).transpose()?;
        let wanted = |d: &DeliveryRecord| {
            status.is_none_or(|s| DeliveryStatus::from(d.status) == s)
                && thing.as_ref().is_none_or(|t| d.thing == *t)
        };
        // Pages of the log until one more than asked matched, or it ended; a filter
        // reads at most 100 pages (then the page is short and says there is more).
        let mut found = Vec::new();
        let mut ended = false;
        for _ in 0..100 {
            let page = api
                .fleet
                .routes()
                .deliveries(&route.id, before, 500)
                .await
                .map_err(ApiError::from)?;
            ended = page.len() < 500;
            before = page.last().map(DeliveryRecord::key);
            found.extend(page.into_iter().filter(|d| wanted(d)));
            if ended || found.len() > first {
                break;
            }
        }
        let more = found.len() > first || !ended;
        found.truncate(first);
        let edges: Vec<DeliveryEdge> = found
            .into_iter()
            .map(|d| DeliveryEdge {
                cursor: cursor_of(d.key()),
                node: Delivery(d),
            })
            .collect();
        Ok(DeliveryConnection {
            page_info: PageInfo {
                has_next_page: more,
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }
}

/// How a route's delivery is going.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "twin_actors::routing::RouteHealth")]
pub enum RouteHealth {
    /// Its last attempt went through (or it has had none).
    Healthy,
    /// Its last attempt failed; the event is tried again.
    Retrying,
    /// It delivers nothing until `resumeRoute` (a 410, or failing longer than
    /// `webhook_disable_after`).
    Disabled,
}

/// A route's health, since when, and the last failure.
#[derive(SimpleObject)]
pub struct RouteStatus {
    pub route_id: ID,
    pub health: RouteHealth,
    /// The last failed attempt's HTTP status or error, or why the route was disabled.
    pub last_error: Option<String>,
    /// When it changed to this health.
    pub since: DateTime,
}

impl From<twin_actors::routing::RouteStatus> for RouteStatus {
    fn from(s: twin_actors::routing::RouteStatus) -> Self {
        Self {
            route_id: ID(s.route),
            health: s.health.into(),
            last_error: s.last_error,
            since: DateTime(s.since),
        }
    }
}

/// The current status of every route (or of `only`).
fn current(table: &RouteTable, only: Option<&str>) -> Vec<RouteStatus> {
    table
        .all()
        .iter()
        .filter(|r| only.is_none_or(|id| r.record.id == id))
        .filter_map(|r| table.status(&r.record.id))
        .map(RouteStatus::from)
        .collect()
}

#[derive(Default)]
pub struct RoutesSubscription;

#[Subscription]
impl RoutesSubscription {
    /// Each change of a route's health (of every route, or of `id`): healthy, retrying or
    /// disabled, with the last error. It starts with each route's health now; a
    /// subscriber that fell behind gets each route's health now again, so it never holds
    /// a stale one.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn route_status_changed(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = RouteStatus> + use<>> {
        let table = api(ctx).fleet.routes().table().clone();
        let only = id.map(|id| id.0);
        let live = lagging(table.status_changes());
        let now = current(&table, only.as_deref());
        let changes = live.flat_map(move |change| {
            let out = match change {
                Ok(s) if only.as_ref().is_none_or(|id| *id == s.route) => vec![s.into()],
                Ok(_) => Vec::new(),
                Err(_) => current(&table, only.as_deref()),
            };
            stream::iter(out)
        });
        Ok(stream::iter(now).chain(changes))
    }
}

#[derive(Default)]
pub struct RoutesMutation;

#[Object]
impl RoutesMutation {
    /// Creates a route: events of `events` types whose thing matches `filter` right after
    /// the event go to `destination`, from now on. The answer has the signing secret,
    /// shown only here. `INVALID_ARGUMENT` names what is wrong.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn create_route(
        &self,
        ctx: &Context<'_>,
        name: String,
        events: Vec<EventType>,
        filter: Option<String>,
        destination: DestinationInput,
    ) -> async_graphql::Result<RouteWithSecret> {
        let spec = RouteSpec {
            name: Some(name),
            events: Some(self::events(events)),
            filter: Some(filter),
            destination: Some(self::destination(destination)?),
        };
        let (route, secret) = api(ctx)
            .fleet
            .routes()
            .create(spec)
            .await
            .map_err(ApiError::from)?;
        Ok(RouteWithSecret {
            route: Route(route),
            secret,
        })
    }

    /// Changes what is given (an empty `filter` removes it).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn update_route(
        &self,
        ctx: &Context<'_>,
        id: ID,
        name: Option<String>,
        events: Option<Vec<EventType>>,
        filter: Option<String>,
        destination: Option<DestinationInput>,
    ) -> async_graphql::Result<Route> {
        let spec = RouteSpec {
            name,
            events: events.map(self::events),
            filter: filter.map(Some),
            destination: destination.map(self::destination).transpose()?,
        };
        let route = api(ctx)
            .fleet
            .routes()
            .update(&id, spec)
            .await
            .map_err(ApiError::from)?;
        Ok(Route(route))
    }

    /// Stops delivering; events wait in the outbox (within `route_retention`).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn pause_route(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Route> {
        let route = api(ctx).fleet.routes().set_paused(&id, true).await;
        Ok(Route(route.map_err(ApiError::from)?))
    }

    /// Delivers again from where it stopped (a disabled route too).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn resume_route(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Route> {
        let route = api(ctx).fleet.routes().set_paused(&id, false).await;
        Ok(Route(route.map_err(ApiError::from)?))
    }

    /// Delivers again the events the route took between `since` and `until`, in order per
    /// thing and with their ids, then goes on from where it was.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn replay_route(
        &self,
        ctx: &Context<'_>,
        id: ID,
        since: DateTime,
        until: DateTime,
    ) -> async_graphql::Result<Route> {
        let route = api(ctx).fleet.routes().replay(&id, since.0, until.0).await;
        Ok(Route(route.map_err(ApiError::from)?))
    }

    /// Delivers one event again (`eventId` as `webhook-id` has it), out of its order,
    /// then goes on from where the route was.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn redeliver(
        &self,
        ctx: &Context<'_>,
        route: ID,
        event_id: String,
    ) -> async_graphql::Result<Route> {
        let position = route::event_position(&event_id).ok_or_else(|| {
            ApiError::invalid(format!(
                "{event_id:?} is not an event id (evt_ and 16 hex digits)"
            ))
        })?;
        let done = api(ctx).fleet.routes().redeliver(&route, position).await;
        Ok(Route(done.map_err(ApiError::from)?))
    }

    /// A new signing secret, shown only here; the old one signs too for
    /// `overlapSeconds` (default a day), so receivers can switch without a gap.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn rotate_route_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
        #[graphql(default = 86400)] overlap_seconds: u32,
    ) -> async_graphql::Result<RouteWithSecret> {
        let overlap = Duration::from_secs(u64::from(overlap_seconds));
        let (route, secret) = api(ctx)
            .fleet
            .routes()
            .rotate_secret(&id, overlap)
            .await
            .map_err(ApiError::from)?;
        Ok(RouteWithSecret {
            route: Route(route),
            secret,
        })
    }

    /// Deletes a route with its delivery log; false when there was none.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn delete_route(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<bool> {
        Ok(api(ctx)
            .fleet
            .routes()
            .delete(&id)
            .await
            .map_err(ApiError::from)?)
    }
}
