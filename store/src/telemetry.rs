//! The store's metrics: group commits (batch sizes and latency) and failed commits.

use std::sync::LazyLock;
use std::time::Duration;

use twin_telemetry::{
    ByLabel, Counter, Family, Gauge, Histogram, LATENCY_SECONDS, Labels, Registry, SIZES, Unit,
    label_values,
};

label_values! {
    enum Failure {
        /// The store could not be reached (nothing was written).
        Unavailable = "unavailable",
        /// Any other failure (the outcome of the write is unknown).
        Other = "other",
    }
}

struct Metrics {
    batch_writes: Histogram,
    batch_latency: Histogram,
    errors_family: Family<Labels, Counter>,
    errors: ByLabel<Failure, Counter>,
    queued: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let errors_family = Family::default();
    Metrics {
        batch_writes: Histogram::new(SIZES),
        batch_latency: Histogram::new(LATENCY_SECONDS),
        errors: ByLabel::new(&errors_family, "kind"),
        errors_family,
        queued: Gauge::default(),
    }
});

/// Registers the store's metrics (under the registry's `doppel_` prefix).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "commit_batch_writes",
        "Writes per durable group commit",
        m.batch_writes.clone(),
    );
    registry.register_with_unit(
        "commit_duration",
        "Time a durable group commit took (every change in it waited that long)",
        Unit::Seconds,
        m.batch_latency.clone(),
    );
    registry.register(
        "commit_queue",
        "Commit requests waiting while a durable commit runs (sampled when each commit starts)",
        m.queued.clone(),
    );
    registry.register(
        "store_errors",
        "Failed durable commits, by kind (unavailable: nothing was written)",
        m.errors_family.clone(),
    );
}

/// A commit of `writes` that took `took`; `failed` says whether the store was unavailable
/// when it failed; `trace` is a traced request's in the batch, for the latency's exemplar.
pub(crate) fn committed(writes: usize, took: Duration, failed: Option<bool>, trace: Option<&str>) {
    let m = &*METRICS;
    m.batch_writes.observe(writes as f64);
    m.batch_latency.observe_duration_traced(took, trace);
    if let Some(unavailable) = failed {
        let kind = if unavailable {
            Failure::Unavailable
        } else {
            Failure::Other
        };
        m.errors.get(kind).inc();
    }
}

pub(crate) fn queued(waiting: usize) {
    METRICS
        .queued
        .set(i64::try_from(waiting).unwrap_or(i64::MAX));
}
