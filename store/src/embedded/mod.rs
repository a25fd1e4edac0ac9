//! The embedded backend: fjall (an LSM tree) on local disk.
//!
//! Measured on this workload (a shadow document and an event per update, ~600 bytes
//! each, durable batches): fjall 69k updates/s at 100 per commit and 91k at 1000, redb
//! 47k and 69k, with about the same disk use. See the README's storage section.
//!
//! Layout, one keyspace each (thing ids and shadow names never contain `\0`):
//! - `things`:   `{thing}` -> [`ThingRecord`] (JSON)
//! - `presence`: `{thing}` -> [`Connectivity`](twin_model::Connectivity) (JSON)
//! - `shadows`:  `{thing}\0{shadow}` -> [`Shadow`](twin_model::Shadow) (JSON)
//! - `commands`: `{thing}\0{executionId}` -> [`CommandExecution`] (JSON); execution ids
//!   sort in creation order.
//! - `command_ids`: `{executionId}` -> `{thing}`, to find an execution by its id alone.
//! - `jobs`: `{jobId}` -> [`JobDefinition`] (JSON)
//! - `job_execs`: `{thing}\0{jobId}` -> [`JobExecution`](twin_model::job::JobExecution) (JSON)
//! - `job_targets`: `{jobId}\0{thing}` -> the execution's status (JSON), to count a job's
//!   executions without reading them; kept when the thing is deleted.
//! - `events`:   `{thing}\0{shadow}\0{slot:be64}` -> [`HistoryEntry`] (JSON: the change
//!   and the shadow it produced, for time travel): a ring of
//!   the newest changes per shadow, slot = (2 * version + is_delete) mod (2 * history).
//!   Each change overwrites the slot of the change `history` versions older, so the
//!   history stays bounded without tombstones (two writes per update, not four); a
//!   delete, which keeps its shadow's version, has a slot of its own.
//!
//! - `members`:  `{partition:be16}{thing}` -> empty: the registered things of each
//!   placement partition, the [`IndexSource`] of the fleet index.
//! - `deadlines`: `{partition:be16}{thing}\0{c|j}{executionId|jobId}` -> deadline
//!   (be64 milliseconds): every pending command and running job execution with a
//!   deadline, kept with each write of one ([`DeadlineIndex`]).
//! - `certificates`: `{certificateId}` -> [`CertificateRecord`](crate::CertificateRecord)
//!   (JSON): registered device certificates; which things each may log in as is on the
//!   things' records.
//! - `ca_certificates`: `{certificateId}` -> [`CaRecord`](crate::CaRecord) (JSON): the
//!   registered CAs.
//! - `templates`: `{name}` -> [`ProvisioningTemplate`] (JSON): fleet provisioning.
//! - `audit`: `{seq:be64}` -> [`AuditEntry`](crate::audit::AuditEntry) (JSON): the audit
//!   log, a hash chain.
//! - `outbox`: `{position:be64}` -> [`OutboxRecord`](crate::routes::OutboxRecord) (JSON):
//!   events for routes, in commit order; `event_seqs`: `{thing}` -> be64, each thing's
//!   newest event number (kept when the thing is deleted).
//! - `routes`: `{routeId}` -> [`RouteRecord`](crate::routes::RouteRecord) (JSON);
//!   `route_cursors`: `{routeId}` -> be64 position; `deliveries`:
//!   `{routeId}\0{at:be64}{position:be64}{attempt:be32}` ->
//!   [`DeliveryRecord`](crate::routes::DeliveryRecord) (JSON), the delivery log.
//! - `telemetry_latest`: `{thing}` -> [`Latest`](twin_model::telemetry::Latest) (JSON):
//!   the newest value of each telemetry key.
//! - `telemetry_day_{day}` (one keyspace per UTC day since the epoch):
//!   `{thing}\0{key}\0{at:be64}` -> the reading (be64 `f64`): numeric telemetry for the
//!   series; retention drops whole days.
//! - `meta`: `layout` -> the layout version ([`LAYOUT`]); a directory written by an
//!   older version gets the listings above built once when it is opened.
//!
//! A `LOCK` file held with an OS lock keeps a second process off the directory.
//!
//! [`Engine`] is the blocking engine (the CLI uses it directly); [`EmbeddedStore`] runs
//! it on tokio's blocking pool behind the async [`TwinStore`] traits.

mod engine;
mod outbox;
mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use twin_model::certificate::CertificateId;
use twin_model::command::CommandExecution;
use twin_model::history::HistoryEntry;
use twin_model::job::{JobDefinition, JobStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::telemetry::Series;
use twin_model::{DeviceId, ShadowName};

pub use engine::{Engine, LAYOUT};

use crate::audit::AuditEntry;
use crate::routes::{DeliveryKey, DeliveryRecord, OutboxRecord, RouteRecord};
use crate::{
    AuditStore, CaRecord, CertificateRecord, CertificateStore, CommandStore, Deadline,
    DeadlineIndex, IndexPage, IndexSource, JobCounts, JobStore, RegistryStore, RouteStore,
    StoreError, TelemetryStore, ThingRecord, TwinSnapshot, TwinStateStore, TwinStore, Write,
};

/// The embedded backend behind the async [`TwinStore`] traits: each call runs the
/// [`Engine`] on tokio's blocking pool, where a test's paused clock also sees it running.
#[derive(Clone)]
pub struct EmbeddedStore {
    engine: Arc<Engine>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`; see [`Engine::open`].
    pub fn open(dir: impl Into<PathBuf>, history: u64) -> Result<Self, StoreError> {
        Ok(Self {
            engine: Arc::new(Engine::open(dir, history)?),
        })
    }

    /// The blocking engine, for callers that are not on an async runtime (the CLI).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| StoreError::Engine(format!("a store call panicked: {e}")))?
    }
}

#[async_trait]
impl RouteStore for EmbeddedStore {
    async fn put_route(&self, route: &RouteRecord) -> Result<(), StoreError> {
        let route = route.clone();
        self.blocking(move |e| e.outbox.put_route(&e.db, &route))
            .await
    }

    async fn delete_route(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.blocking(move |e| e.outbox.delete_route(&e.db, &id))
            .await
    }

    async fn routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        self.blocking(|e| e.outbox.routes()).await
    }

    async fn outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.blocking(move |e| e.outbox.outbox(after, limit)).await
    }

    async fn outbox_end(&self) -> Result<u64, StoreError> {
        Ok(self.engine.outbox.outbox_end())
    }

    async fn put_cursor(&self, route: &str, position: u64) -> Result<(), StoreError> {
        let route = route.to_owned();
        self.blocking(move |e| e.outbox.put_cursor(&e.db, &route, position))
            .await
    }

    async fn cursor(&self, route: &str) -> Result<Option<u64>, StoreError> {
        let route = route.to_owned();
        self.blocking(move |e| e.outbox.cursor(&route)).await
    }

    async fn put_deliveries(&self, deliveries: &[DeliveryRecord]) -> Result<(), StoreError> {
        let deliveries = deliveries.to_vec();
        self.blocking(move |e| e.outbox.put_deliveries(&e.db, &deliveries))
            .await
    }

    async fn deliveries(
        &self,
        route: &str,
        before: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let route = route.to_owned();
        self.blocking(move |e| e.outbox.deliveries(&route, before, limit))
            .await
    }

    async fn prune_routes(
        &self,
        events_before: u64,
        deliveries_before: u64,
    ) -> Result<u64, StoreError> {
        self.blocking(move |e| e.outbox.prune(&e.db, events_before, deliveries_before))
            .await
    }
}

#[async_trait]
impl TelemetryStore for EmbeddedStore {
    async fn telemetry_series(
        &self,
        thing: &DeviceId,
        key: &str,
        series: Series,
    ) -> Result<Series, StoreError> {
        let (thing, key) = (thing.clone(), key.to_owned());
        self.blocking(move |e| e.telemetry.series(&thing, &key, series))
            .await
    }

    async fn prune_telemetry(&self, before: u64) -> Result<u64, StoreError> {
        self.blocking(move |e| e.telemetry.prune(&e.db, before))
            .await
    }
}

#[async_trait]
impl TwinStateStore for EmbeddedStore {
    async fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        let thing = thing.clone();
        self.blocking(move |e| e.load(&thing)).await
    }

    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.blocking(move |e| e.commit(&batch)).await
    }

    async fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let (thing, shadow) = (thing.clone(), shadow.clone());
        self.blocking(move |e| e.history(&thing, &shadow, before, limit))
            .await
    }
}

#[async_trait]
impl RegistryStore for EmbeddedStore {
    async fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        let thing = thing.clone();
        self.blocking(move |e| e.thing(&thing)).await
    }

    async fn things(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<ThingRecord>, StoreError> {
        let after = after.cloned();
        self.blocking(move |e| e.things(after.as_ref(), limit))
            .await
    }
}

#[async_trait]
impl CommandStore for EmbeddedStore {
    async fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError> {
        let id = execution_id.to_owned();
        self.blocking(move |e| e.command(&id)).await
    }

    async fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        let (thing, before) = (thing.clone(), before.map(str::to_owned));
        self.blocking(move |e| e.commands(&thing, before.as_deref(), limit))
            .await
    }
}

#[async_trait]
impl JobStore for EmbeddedStore {
    async fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError> {
        let id = job_id.to_owned();
        self.blocking(move |e| e.job(&id)).await
    }

    async fn jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, StoreError> {
        let after = after.map(str::to_owned);
        self.blocking(move |e| e.jobs(after.as_deref(), limit))
            .await
    }

    async fn job_statuses(
        &self,
        job_id: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        let (id, after) = (job_id.to_owned(), after.cloned());
        self.blocking(move |e| e.job_statuses(&id, after.as_ref(), limit))
            .await
    }

    async fn job_counts(&self, job_id: &str) -> Result<JobCounts, StoreError> {
        let id = job_id.to_owned();
        self.blocking(move |e| e.job_counts(&id)).await
    }
}

#[async_trait]
impl DeadlineIndex for EmbeddedStore {
    async fn pending_deadlines(
        &self,
        partition: u16,
        after: Option<(&DeviceId, &str)>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        let after = after.map(|(t, i)| (t.clone(), i.to_owned()));
        self.blocking(move |e| {
            e.pending_deadlines(
                partition,
                after.as_ref().map(|(t, i)| (t, i.as_str())),
                limit,
            )
        })
        .await
    }
}

#[async_trait]
impl IndexSource for EmbeddedStore {
    async fn index_page(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<IndexPage, StoreError> {
        let after = after.cloned();
        self.blocking(move |e| e.index_page(partition, after.as_ref(), limit))
            .await
    }
}

#[async_trait]
impl CertificateStore for EmbeddedStore {
    async fn put_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |e| e.put_certificate(&record)).await
    }

    async fn certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let id = id.clone();
        self.blocking(move |e| e.certificate(&id)).await
    }

    async fn certificates(
        &self,
        after: Option<&CertificateId>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let after = after.cloned();
        self.blocking(move |e| e.certificates(after.as_ref(), limit))
            .await
    }

    async fn put_ca_certificate(&self, record: &CaRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |e| e.put_ca_certificate(&record)).await
    }

    async fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError> {
        self.blocking(Engine::ca_certificates).await
    }

    async fn put_template(&self, template: &ProvisioningTemplate) -> Result<(), StoreError> {
        let template = template.clone();
        self.blocking(move |e| e.put_template(&template)).await
    }

    async fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError> {
        self.blocking(Engine::templates).await
    }
}

#[async_trait]
impl AuditStore for EmbeddedStore {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError> {
        let entry = entry.clone();
        self.blocking(move |e| e.append_audit(&entry)).await
    }

    async fn put_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        self.blocking(move |e| e.put_audit(&entry)).await
    }

    async fn audit_entries(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.blocking(move |e| e.audit_entries(after, limit)).await
    }

    async fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        self.blocking(Engine::last_audit).await
    }
}

#[async_trait]
impl TwinStore for EmbeddedStore {
    async fn flush(&self) -> Result<(), StoreError> {
        self.blocking(Engine::flush).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance_suite!(|history| async move {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), history).unwrap();
        crate::conformance::Backend {
            store: std::sync::Arc::new(store),
            keep: Box::new(dir),
            cleanup: None,
        }
    });
}
