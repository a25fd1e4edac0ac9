//! The GraphQL API's metrics: requests by operation type and outcome with their latency,
//! active subscriptions, and `Lagged` events sent. Recorded by the [`Metered`] schema
//! extension, so every way in (HTTP, WebSocket, `schema.execute`) is counted alike.
//! A traced request's latency names its trace (an exemplar), and each of its top-level
//! fields gets a `graphql.resolve` span.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest,
    NextResolve, NextSubscribe, ResolveInfo,
};
use async_graphql::futures_util::StreamExt as _;
use async_graphql::futures_util::stream::BoxStream;
use async_graphql::parser::types::{ExecutableDocument, OperationType};
use async_graphql::{Response, ServerResult, Value, Variables};
use tracing::Instrument as _;
use twin_telemetry::trace;
use twin_telemetry::{
    Counter, Family, Gauge, Histogram, HistogramFamily, LATENCY_SECONDS, LabelValues as _, Labels,
    Labels2, Registry, Unit, children, histogram_family, label_values,
};

label_values! {
    /// The operation a request ran; `invalid` when it is not known (the document did not
    /// parse, or holds several kinds of operation and none was chosen).
    enum Kind { Query = "query", Mutation = "mutation", Subscription = "subscription", Invalid = "invalid" }
}

label_values! {
    enum Outcome { Ok = "ok", Error = "error" }
}

struct Metrics {
    requests_family: Family<Labels2, Counter>,
    /// Indexed by kind, then outcome.
    requests: Vec<Counter>,
    latency_family: HistogramFamily<Labels>,
    latency: Vec<Histogram>,
    subscriptions: Gauge,
    lagged: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let requests_family = Family::default();
    let requests = children(
        &requests_family,
        Kind::ALL.iter().flat_map(|k| {
            Outcome::ALL
                .iter()
                .map(|o| [("type", k.label()), ("outcome", o.label())])
        }),
    );
    let latency_family = histogram_family(LATENCY_SECONDS);
    let latency = children(
        &latency_family,
        Kind::ALL.iter().map(|k| [("type", k.label())]),
    );
    Metrics {
        requests_family,
        requests,
        latency_family,
        latency,
        subscriptions: Gauge::default(),
        lagged: Counter::default(),
    }
});

/// Registers the GraphQL API's metrics (under the registry's `doppel_` prefix).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "graphql_requests",
        "GraphQL requests (a subscription once, when it starts), by operation type and outcome (error: the response carried errors)",
        m.requests_family.clone(),
    );
    registry.register_with_unit(
        "graphql_request_duration",
        "Time from a GraphQL request to its response (for a subscription, to its start)",
        Unit::Seconds,
        m.latency_family.clone(),
    );
    registry.register(
        "graphql_subscriptions",
        "GraphQL subscriptions open now",
        m.subscriptions.clone(),
    );
    registry.register(
        "graphql_lagged",
        "Times a subscriber fell behind the fleet's event stream and was sent Lagged",
        m.lagged.clone(),
    );
}

pub(crate) fn lagged() {
    METRICS.lagged.inc();
}

/// A request of `kind` that ended with `outcome`; `trace` is its `traceparent` when it
/// was traced, for the latency's exemplar.
fn record(kind: Kind, outcome: Outcome, started: Instant, trace: Option<&str>) {
    let m = &*METRICS;
    m.requests[kind.index() * Outcome::ALL.len() + outcome.index()].inc();
    m.latency[kind.index()].observe_duration_traced(started.elapsed(), trace);
}

/// The schema extension that records every request.
pub(crate) struct Metered;

impl ExtensionFactory for Metered {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(MeteredRequest::default())
    }
}

/// One request: the operations its document holds (set when it is parsed), and the
/// one that ran (set when it executes).
#[derive(Default)]
struct MeteredRequest {
    operations: Mutex<Vec<(Option<String>, OperationType)>>,
    kind: AtomicUsize,
}

const UNSET: usize = usize::MAX;

impl MeteredRequest {
    fn kind(&self) -> Kind {
        Kind::ALL
            .get(self.kind.load(Ordering::Relaxed))
            .copied()
            .unwrap_or(Kind::Invalid)
    }
}

fn kind_of(op: OperationType) -> Kind {
    match op {
        OperationType::Query => Kind::Query,
        OperationType::Mutation => Kind::Mutation,
        OperationType::Subscription => Kind::Subscription,
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for MeteredRequest {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        self.kind.store(UNSET, Ordering::Relaxed);
        let started = Instant::now();
        let response = next.run(ctx).await;
        let outcome = if response.errors.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Error
        };
        record(self.kind(), outcome, started, trace::current().as_deref());
        response
    }

    /// A top-level field of a traced request resolves in a span of its own, between the
    /// request's and the twins' it calls.
    async fn resolve(
        &self,
        ctx: &ExtensionContext<'_>,
        info: ResolveInfo<'_>,
        next: NextResolve<'_>,
    ) -> ServerResult<Option<Value>> {
        if info.path_node.parent.is_some() {
            return next.run(ctx, info).await;
        }
        let span = trace::child(|| {
            tracing::debug_span!("graphql.resolve", field = info.name, on = info.parent_type)
        });
        next.run(ctx, info).instrument(span).await
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let started = Instant::now();
        let open = Open::new();
        let mut first = true;
        next.run(ctx, stream)
            .map(move |response| {
                let _open = &open;
                if std::mem::take(&mut first) {
                    let outcome = if response.errors.is_empty() {
                        Outcome::Ok
                    } else {
                        Outcome::Error
                    };
                    record(Kind::Subscription, outcome, started, None);
                }
                response
            })
            .boxed()
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        let operations: Vec<_> = document
            .operations
            .iter()
            .map(|(name, op)| (name.map(|n| n.to_string()), op.node.ty))
            .collect();
        // A document of one kind of operation is that kind even if it fails validation;
        // `execute` says which one ran when there are several.
        if let Some((_, ty)) = operations.first()
            && operations.iter().all(|(_, t)| t == ty)
        {
            self.kind.store(kind_of(*ty).index(), Ordering::Relaxed);
        }
        *self.operations.lock().unwrap_or_else(|e| e.into_inner()) = operations;
        Ok(document)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let chosen = {
            let operations = self.operations.lock().unwrap_or_else(|e| e.into_inner());
            match operation_name {
                Some(name) => operations
                    .iter()
                    .find(|(n, _)| n.as_deref() == Some(name))
                    .map(|(_, ty)| *ty),
                None if operations.len() == 1 => Some(operations[0].1),
                None => None,
            }
        };
        if let Some(ty) = chosen {
            self.kind.store(kind_of(ty).index(), Ordering::Relaxed);
        }
        next.run(ctx, operation_name).await
    }
}

/// An open subscription, counted in `doppel_graphql_subscriptions` until dropped.
struct Open(());

impl Open {
    fn new() -> Self {
        METRICS.subscriptions.inc();
        Self(())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        METRICS.subscriptions.dec();
    }
}
