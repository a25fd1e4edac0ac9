//! The GraphQL schema, merged from one object per domain: [`things`](crate::things) and
//! [`thing_events`](crate::thing_events), [`certificates`](crate::certificates),
//! [`commands`](crate::commands),
//! [`jobs`](crate::jobs) and tokens ([`auth`](crate::auth)). Here: what they share (the
//! [`Api`], the `RoleGuard` every field carries, scalars, paging, the one adapter from
//! the fleet's broadcast to `Lagged`) and the schema's assembly.

use std::sync::Arc;

use async_graphql::futures_util::stream::{self, Stream};
use async_graphql::{
    Context, Guard, ID, InputValueError, InputValueResult, MergedObject, MergedSubscription,
    Scalar, ScalarType, SimpleObject, Value as GqlValue,
};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use twin_actors::FleetHandle;
use twin_model::{DeviceId, Filter, ShadowName};

use crate::audit::AuditQuery;
use crate::auth::{Principal, Role, Tokens, TokensMutation};
use crate::certificates::{CertificatesMutation, CertificatesQuery};
use crate::cluster::ClusterQuery;
use crate::commands::{CommandsMutation, CommandsQuery, CommandsSubscription};
use crate::error::{ApiError, ApiResult, Code};
use crate::jobs::resolvers::{JobsMutation, JobsQuery, JobsSubscription};
use crate::provisioning::{ProvisioningMutation, ProvisioningQuery};
use crate::routes::{RoutesMutation, RoutesQuery, RoutesSubscription};
use crate::thing_events::ThingsSubscription;
use crate::things::{ThingsMutation, ThingsQuery};

/// What every resolver shares.
pub struct Api {
    pub fleet: FleetHandle,
    pub tokens: Arc<Tokens>,
    pub limits: ApiLimits,
    /// Signs job documents.
    pub signer: Arc<crate::Signer>,
    /// The cluster this process is a node of; `None` on a single node.
    pub cluster: Option<Arc<dyn crate::cluster::ClusterView>>,
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

/// What every resolver shares (behind its [`RoleGuard`]).
pub(crate) fn api<'a>(ctx: &Context<'a>) -> &'a Api {
    ctx.data_unchecked::<Api>()
}

/// The caller of a field behind a [`RoleGuard`] (which found it).
pub(crate) fn caller<'a>(ctx: &Context<'a>) -> &'a Principal {
    ctx.data_unchecked::<Principal>()
}

/// Lets a field through for callers with at least this role: `UNAUTHENTICATED` without a
/// token, `FORBIDDEN` with too small a role. Every field of the schema has one.
pub(crate) struct RoleGuard(pub(crate) Role);

impl Guard for RoleGuard {
    async fn check(&self, ctx: &Context<'_>) -> async_graphql::Result<()> {
        ctx.data_opt::<Principal>()
            .ok_or_else(|| ApiError::new(Code::Unauthenticated, "a bearer token is required"))?
            .require(self.0)?;
        Ok(())
    }
}

impl Api {
    /// A page's `first` argument, checked against `max_page_size`.
    pub(crate) fn page_size(&self, first: i32) -> ApiResult<usize> {
        let max = self.limits.max_page_size;
        usize::try_from(first)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("first must be between 1 and {max}")))
    }
}

pub(crate) fn thing_id(id: &ID) -> ApiResult<DeviceId> {
    Ok(DeviceId::parse(id.as_str())?)
}

pub(crate) fn shadow_name(name: Option<&str>) -> ApiResult<ShadowName> {
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

/// An RFC 3339 UTC timestamp, such as `2026-11-23T08:21:00.123Z`.
#[derive(Debug, Clone, Copy)]
pub struct DateTime(pub u64);

#[Scalar(name = "DateTime")]
impl ScalarType for DateTime {
    fn parse(value: GqlValue) -> InputValueResult<Self> {
        match &value {
            GqlValue::String(s) => twin_model::parse_rfc3339(s)
                .map(DateTime)
                .map_err(InputValueError::custom),
            _ => Err(InputValueError::custom(format!(
                "a DateTime is an RFC 3339 string such as \"2026-11-23T08:21:00Z\", got {value}"
            ))),
        }
    }

    fn to_value(&self) -> GqlValue {
        GqlValue::String(twin_model::rfc3339(self.0))
    }
}

#[derive(SimpleObject)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
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

/// A broadcast receiver as a stream: each message, or `Err(skipped)` where the subscriber
/// fell behind and that many were dropped for it. Every subscription reads the fleet's
/// pipeline through this one adapter and turns a gap into its `Lagged` event.
pub(crate) fn lagging<T: Clone + Send + 'static>(
    rx: Receiver<T>,
) -> impl Stream<Item = Result<T, u64>> + Send + 'static {
    stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(v) => Some((Ok(v), rx)),
            Err(RecvError::Lagged(skipped)) => {
                crate::telemetry::lagged();
                Some((Err(skipped), rx))
            }
            Err(RecvError::Closed) => None,
        }
    })
}

// Every query, one object per domain (a doc comment would become its SDL description).
#[derive(MergedObject, Default)]
pub struct Query(
    ThingsQuery,
    CertificatesQuery,
    CommandsQuery,
    JobsQuery,
    ProvisioningQuery,
    AuditQuery,
    RoutesQuery,
    ClusterQuery,
);

// Every mutation, one object per domain.
#[derive(MergedObject, Default)]
pub struct Mutation(
    ThingsMutation,
    CertificatesMutation,
    ProvisioningMutation,
    CommandsMutation,
    JobsMutation,
    TokensMutation,
    RoutesMutation,
);

// Every subscription, one object per domain.
#[derive(MergedSubscription, Default)]
pub struct SubscriptionRoot(
    ThingsSubscription,
    CommandsSubscription,
    JobsSubscription,
    RoutesSubscription,
);

pub type DoppelSchema = async_graphql::Schema<Query, Mutation, SubscriptionRoot>;

/// The schema over a running fleet.
pub fn build(api: Api) -> DoppelSchema {
    let limits = api.limits;
    let audit = crate::audit::Audited {
        fleet: api.fleet.clone(),
    };
    async_graphql::Schema::build(
        Query::default(),
        Mutation::default(),
        SubscriptionRoot::default(),
    )
    .data(api)
    .limit_depth(limits.max_depth)
    .limit_complexity(limits.max_complexity)
    .extension(crate::telemetry::Metered)
    .extension(audit)
    .extension(crate::error::Coded {
        max_depth: limits.max_depth,
        max_complexity: limits.max_complexity,
    })
    .finish()
}

/// The schema's SDL (for `doppel schema` and the drift test); needs no fleet.
pub fn sdl() -> String {
    async_graphql::Schema::build(
        Query::default(),
        Mutation::default(),
        SubscriptionRoot::default(),
    )
    .finish()
    .sdl()
}
