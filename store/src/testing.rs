//! A store for testing what sits on top of one (feature `test-util`): its commits wait at
//! a gate until the test opens it, so that work piles up behind them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use twin_model::certificate::CertificateId;
use twin_model::command::CommandExecution;
use twin_model::history::HistoryEntry;
use twin_model::job::{JobDefinition, JobStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::telemetry::Series;
use twin_model::{DeviceId, ShadowName};

use crate::audit::AuditEntry;
use crate::routes::{DeliveryKey, DeliveryRecord, OutboxRecord, RouteRecord};
use crate::{
    AuditStore, CaRecord, CertificateRecord, CertificateStore, CommandStore, Deadline,
    DeadlineIndex, IndexPage, IndexSource, JobCounts, JobStore, RegistryStore, RouteStore,
    StoreError, TelemetryStore, ThingRecord, TwinSnapshot, TwinStateStore, TwinStore, Write,
};

/// Reads find nothing, except that with `registered` every thing exists. Every commit
/// notifies `arrived`, waits until `released`, is recorded in `batches` (its size), and
/// fails when `fail`; the writes of the things in `fenced` are refused as another node's
/// ([`StoreError::FencedSome`]), the others applied.
#[derive(Default)]
pub struct GatedStore {
    pub registered: bool,
    pub released: Arc<AtomicBool>,
    pub fail: AtomicBool,
    pub batches: Mutex<Vec<usize>>,
    pub arrived: tokio::sync::Notify,
    pub fenced: Mutex<Vec<DeviceId>>,
}

impl GatedStore {
    /// A store in which every thing is registered and enabled.
    pub fn registered() -> Self {
        Self {
            registered: true,
            ..Self::default()
        }
    }
}

#[async_trait]
impl TwinStateStore for GatedStore {
    async fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        let record = self.registered.then(|| ThingRecord {
            id: thing.clone(),
            secret_hash: String::new(),
            enabled: true,
            created_at: 0,
            attributes: Default::default(),
            certificates: Vec::new(),
        });
        Ok(TwinSnapshot {
            record,
            ..TwinSnapshot::default()
        })
    }

    /// Waits on the blocking pool, as a disk would: a test's paused clock does not jump
    /// ahead while a commit is held.
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.arrived.notify_one();
        let released = self.released.clone();
        let _ = tokio::task::spawn_blocking(move || {
            while !released.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
        .await;
        self.batches.lock().unwrap().push(batch.len());
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("disk on fire".into()));
        }
        let refused: Vec<crate::Refused> = self
            .fenced
            .lock()
            .unwrap()
            .iter()
            .filter_map(|thing| {
                let positions: Vec<usize> = (0..batch.len())
                    .filter(|&i| batch[i].thing() == Some(thing))
                    .collect();
                (!positions.is_empty()).then(|| crate::Refused {
                    positions,
                    thing: thing.to_string(),
                    reason: "taken over".into(),
                })
            })
            .collect();
        if refused.is_empty() {
            Ok(())
        } else {
            Err(StoreError::FencedSome(refused))
        }
    }

    async fn history(
        &self,
        _: &DeviceId,
        _: &ShadowName,
        _: Option<u64>,
        _: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        Ok(vec![])
    }
}

#[async_trait]
impl RegistryStore for GatedStore {
    async fn thing(&self, _: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        Ok(None)
    }
    async fn things(&self, _: Option<&DeviceId>, _: usize) -> Result<Vec<ThingRecord>, StoreError> {
        Ok(vec![])
    }
}

#[async_trait]
impl CommandStore for GatedStore {
    async fn command(&self, _: &str) -> Result<Option<CommandExecution>, StoreError> {
        Ok(None)
    }
    async fn commands(
        &self,
        _: &DeviceId,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        Ok(vec![])
    }
}

#[async_trait]
impl JobStore for GatedStore {
    async fn job(&self, _: &str) -> Result<Option<JobDefinition>, StoreError> {
        Ok(None)
    }
    async fn jobs(&self, _: Option<&str>, _: usize) -> Result<Vec<JobDefinition>, StoreError> {
        Ok(vec![])
    }
    async fn job_statuses(
        &self,
        _: &str,
        _: Option<&DeviceId>,
        _: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        Ok(vec![])
    }
    async fn job_counts(&self, _: &str) -> Result<JobCounts, StoreError> {
        Ok(JobCounts::default())
    }
}

#[async_trait]
impl DeadlineIndex for GatedStore {
    async fn pending_deadlines(
        &self,
        _: u16,
        _: Option<(&DeviceId, &str)>,
        _: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        Ok(vec![])
    }
}

#[async_trait]
impl IndexSource for GatedStore {
    async fn index_page(
        &self,
        _: u16,
        _: Option<&DeviceId>,
        _: usize,
    ) -> Result<IndexPage, StoreError> {
        Ok(IndexPage::default())
    }
}

#[async_trait]
impl CertificateStore for GatedStore {
    async fn put_certificate(&self, _: &CertificateRecord) -> Result<(), StoreError> {
        Ok(())
    }
    async fn certificate(
        &self,
        _: &CertificateId,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(None)
    }
    async fn certificates(
        &self,
        _: Option<&CertificateId>,
        _: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        Ok(vec![])
    }
    async fn put_ca_certificate(&self, _: &CaRecord) -> Result<(), StoreError> {
        Ok(())
    }
    async fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError> {
        Ok(vec![])
    }
    async fn put_template(&self, _: &ProvisioningTemplate) -> Result<(), StoreError> {
        Ok(())
    }
    async fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError> {
        Ok(vec![])
    }
}

#[async_trait]
impl AuditStore for GatedStore {
    async fn append_audit(&self, _: &AuditEntry) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn put_audit(&self, _: &AuditEntry) -> Result<(), StoreError> {
        Ok(())
    }
    async fn audit_entries(&self, _: Option<u64>, _: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(vec![])
    }
    async fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        Ok(None)
    }
}

#[async_trait]
impl RouteStore for GatedStore {
    async fn put_route(&self, _: &RouteRecord) -> Result<(), StoreError> {
        Ok(())
    }
    async fn delete_route(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    async fn routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        Ok(vec![])
    }
    async fn outbox(&self, _: u64, _: usize) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        Ok(vec![])
    }
    async fn outbox_end(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    async fn put_cursor(&self, _: &str, _: u64) -> Result<(), StoreError> {
        Ok(())
    }
    async fn cursor(&self, _: &str) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    async fn put_deliveries(&self, _: &[DeliveryRecord]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn deliveries(
        &self,
        _: &str,
        _: Option<DeliveryKey>,
        _: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(vec![])
    }
    async fn prune_routes(&self, _: u64, _: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[async_trait]
impl TelemetryStore for GatedStore {
    async fn telemetry_series(
        &self,
        _: &DeviceId,
        _: &str,
        s: Series,
    ) -> Result<Series, StoreError> {
        Ok(s)
    }
    async fn prune_telemetry(&self, _: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[async_trait]
impl TwinStore for GatedStore {
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Another store, until it "crashes": past its first `commits` commits, every commit fails
/// without writing, as if the process had been killed before they reached the disk. While
/// `jobs_unreadable`, reads of jobs fail too.
pub struct CrashAfter {
    pub inner: Arc<dyn TwinStore>,
    pub commits: std::sync::atomic::AtomicUsize,
    pub jobs_unreadable: AtomicBool,
}

impl CrashAfter {
    pub fn new(inner: Arc<dyn TwinStore>, commits: usize) -> Self {
        Self {
            inner,
            commits: commits.into(),
            jobs_unreadable: AtomicBool::new(false),
        }
    }

    fn job_read(&self) -> Result<(), StoreError> {
        if self.jobs_unreadable.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("jobs unreadable".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl TwinStateStore for CrashAfter {
    async fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        self.inner.load(thing).await
    }
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        let left = self.commits.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Engine("killed".into()));
        }
        self.commits.store(left - 1, Ordering::SeqCst);
        self.inner.commit(batch).await
    }
    async fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.inner.history(thing, shadow, before, limit).await
    }
}

#[async_trait]
impl RegistryStore for CrashAfter {
    async fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        self.inner.thing(thing).await
    }
    async fn things(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<ThingRecord>, StoreError> {
        self.inner.things(after, limit).await
    }
}

#[async_trait]
impl CommandStore for CrashAfter {
    async fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError> {
        self.inner.command(execution_id).await
    }
    async fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        self.inner.commands(thing, before, limit).await
    }
}

#[async_trait]
impl JobStore for CrashAfter {
    async fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError> {
        self.job_read()?;
        self.inner.job(job_id).await
    }
    async fn jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, StoreError> {
        self.inner.jobs(after, limit).await
    }
    async fn job_statuses(
        &self,
        job_id: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        self.job_read()?;
        self.inner.job_statuses(job_id, after, limit).await
    }
    async fn job_counts(&self, job_id: &str) -> Result<JobCounts, StoreError> {
        self.inner.job_counts(job_id).await
    }
}

#[async_trait]
impl DeadlineIndex for CrashAfter {
    async fn pending_deadlines(
        &self,
        partition: u16,
        after: Option<(&DeviceId, &str)>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        self.inner.pending_deadlines(partition, after, limit).await
    }
}

#[async_trait]
impl IndexSource for CrashAfter {
    async fn index_page(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<IndexPage, StoreError> {
        self.inner.index_page(partition, after, limit).await
    }
}

#[async_trait]
impl CertificateStore for CrashAfter {
    async fn put_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        self.inner.put_certificate(record).await
    }
    async fn certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        self.inner.certificate(id).await
    }
    async fn certificates(
        &self,
        after: Option<&CertificateId>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        self.inner.certificates(after, limit).await
    }
    async fn put_ca_certificate(&self, record: &CaRecord) -> Result<(), StoreError> {
        self.inner.put_ca_certificate(record).await
    }
    async fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError> {
        self.inner.ca_certificates().await
    }
    async fn put_template(&self, template: &ProvisioningTemplate) -> Result<(), StoreError> {
        self.inner.put_template(template).await
    }
    async fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError> {
        self.inner.templates().await
    }
}

#[async_trait]
impl AuditStore for CrashAfter {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError> {
        self.inner.append_audit(entry).await
    }
    async fn put_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.inner.put_audit(entry).await
    }
    async fn audit_entries(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_entries(after, limit).await
    }
    async fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        self.inner.last_audit().await
    }
}

#[async_trait]
impl RouteStore for CrashAfter {
    async fn put_route(&self, route: &RouteRecord) -> Result<(), StoreError> {
        self.inner.put_route(route).await
    }
    async fn delete_route(&self, id: &str) -> Result<(), StoreError> {
        self.inner.delete_route(id).await
    }
    async fn routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        self.inner.routes().await
    }
    async fn outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.inner.outbox(after, limit).await
    }
    async fn outbox_end(&self) -> Result<u64, StoreError> {
        self.inner.outbox_end().await
    }
    async fn put_cursor(&self, route: &str, position: u64) -> Result<(), StoreError> {
        self.inner.put_cursor(route, position).await
    }
    async fn cursor(&self, route: &str) -> Result<Option<u64>, StoreError> {
        self.inner.cursor(route).await
    }
    async fn put_deliveries(&self, deliveries: &[DeliveryRecord]) -> Result<(), StoreError> {
        self.inner.put_deliveries(deliveries).await
    }
    async fn deliveries(
        &self,
        route: &str,
        before: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.inner.deliveries(route, before, limit).await
    }
    async fn prune_routes(&self, events: u64, deliveries: u64) -> Result<u64, StoreError> {
        self.inner.prune_routes(events, deliveries).await
    }
}

#[async_trait]
impl TelemetryStore for CrashAfter {
    async fn telemetry_series(
        &self,
        thing: &DeviceId,
        key: &str,
        series: Series,
    ) -> Result<Series, StoreError> {
        self.inner.telemetry_series(thing, key, series).await
    }
    async fn prune_telemetry(&self, before: u64) -> Result<u64, StoreError> {
        self.inner.prune_telemetry(before).await
    }
}

#[async_trait]
impl TwinStore for CrashAfter {
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}
