//! Doppel's persistence.
//!
//! - [`TwinStore`]: what Doppel needs from a database, split by what callers need: a
//!   twin's own state ([`TwinStateStore`]), the registry ([`RegistryStore`]), commands
//!   ([`CommandStore`]), jobs with paged statuses and counts ([`JobStore`]), pending
//!   deadlines ([`DeadlineIndex`]) and the fleet index's source ([`IndexSource`]), the
//!   last two paged by placement partition ([`twin_model::PARTITIONS`]);
//! - [`embedded::EmbeddedStore`]: the default backend, fjall on local disk;
//! - [`committer::Committer`]: group commit, so that many twins' changes share one
//!   durable write;
//! - `conformance` (feature `test-util`): the suite every backend passes.
//!
//! The traits are async, so that a network database fits them; the embedded backend
//! runs its blocking engine on tokio's blocking pool. [`scylla::ScyllaStore`] is the
//! networked backend (ScyllaDB, or Apache Cassandra).

pub mod audit;
pub mod committer;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod embedded;
pub mod routes;
pub mod scylla;
pub mod secret;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use std::sync::Arc;

use async_trait::async_trait;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twin_model::certificate::{CertificateId, CertificateStatus};
use twin_model::command::CommandExecution;
use twin_model::history::HistoryEntry;
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::telemetry::{Latest, Series};
use twin_model::{Connectivity, DeviceId, Shadow, ShadowChange, ShadowName};

pub use committer::Committer;
pub use embedded::EmbeddedStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {dir} is in use by a running doppel server{}; stop it first, or use the running server",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: String, pid: Option<u32> },
    #[error("storage engine error: {0}")]
    Engine(String),
    /// The database cannot be reached (or did not answer in time): nothing is known to be
    /// written; the caller may retry once it is back.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the store is shutting down")]
    Closed,
    /// This node does not hold the twin's shard (any more): nothing was written. Another
    /// node owns the twin; the caller may retry there.
    #[error("{thing} is not owned by this node: {reason}")]
    Fenced { thing: String, reason: String },
    /// A commit of several twins' writes of which some were refused as [`Fenced`]
    /// (nothing of those twins written), and every other write was applied.
    ///
    /// [`Fenced`]: StoreError::Fenced
    #[error(
        "{} of the commit's twins are not owned by this node (the other writes were applied){}",
        .0.len(),
        .0.first().map(|r| format!(", first {}: {}", r.thing, r.reason)).unwrap_or_default()
    )]
    FencedSome(Vec<Refused>),
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the database could not be reached (rather than refusing or failing).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the request may go through later or on another node, nothing (of the
    /// refused twins) being written: the database could not be reached, or the twin is
    /// another node's.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Fenced { .. } | Self::FencedSome(_)
        )
    }
}

/// The writes of one twin that a commit refused (see [`StoreError::FencedSome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Their positions in the commit's writes.
    pub positions: Vec<usize>,
    pub thing: String,
    pub reason: String,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingRecord {
    pub id: DeviceId,
    /// SHA-256 of the device secret, hex. See [`secret`] for why a fast hash is right here.
    pub secret_hash: String,
    pub enabled: bool,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    /// The registry's free-form description of the thing (site, model, owner...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
    /// The certificates attached to the thing: each may log in as it while ACTIVE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateId>,
}

/// A registered device certificate. Which things it may log in as is kept on each
/// thing's record ([`ThingRecord::certificates`]), so that deleting a thing leaves no
/// attachment behind for a new thing of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRecord {
    pub id: CertificateId,
    /// The certificate, PEM.
    pub pem: String,
    pub status: CertificateStatus,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// The end of the certificate's validity, milliseconds since the epoch.
    pub not_after: u64,
    /// A claim certificate: it logs in as no thing, and may only ask for a certificate
    /// of its own and be provisioned with this template (fleet provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_template: Option<String>,
}

/// Everything persisted about one twin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinSnapshot {
    pub record: Option<ThingRecord>,
    pub connectivity: Connectivity,
    pub shadows: Vec<(ShadowName, Shadow)>,
    /// The commands that have not ended yet, oldest first.
    pub pending_commands: Vec<CommandExecution>,
    /// The thing's job executions, ended ones included.
    pub job_executions: Vec<JobExecution>,
    /// The number of the thing's newest event in the outbox (0: none yet). Kept when
    /// the thing is deleted, so that a thing registered again under its name goes on
    /// counting.
    pub event_seq: u64,
    /// The latest value of each telemetry key.
    pub telemetry: Latest,
}

/// One change inside a commit batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// A shadow's new state and the change that produced it (the event log entry).
    Shadow {
        thing: DeviceId,
        shadow: ShadowName,
        state: Arc<Shadow>,
        change: Arc<ShadowChange>,
    },
    Connectivity {
        thing: DeviceId,
        connectivity: Connectivity,
    },
    Thing(ThingRecord),
    /// A command execution as it is now.
    Command(Arc<CommandExecution>),
    /// A job's definition (written once, when the job is created).
    Job(Arc<JobDefinition>),
    /// A job execution as it is now.
    JobExecution(Arc<JobExecution>),
    /// Removes the thing with its presence, shadows, history, commands and job executions;
    /// each job keeps the status the thing's execution ended with.
    DeleteThing(DeviceId),
    /// An event for routes (see [`routes`]): appended to the outbox, and the thing's
    /// event number kept.
    Event(Arc<routes::OutboxRecord>),
    /// A telemetry message: the thing's latest values after it, and its numeric readings
    /// for the series (kept for the store's telemetry retention).
    Telemetry {
        thing: DeviceId,
        latest: Arc<Latest>,
        points: Arc<[Point]>,
    },
}

impl Write {
    /// The thing whose twin the write is of (`None` for a job's definition).
    pub fn thing(&self) -> Option<&DeviceId> {
        match self {
            Write::Shadow { thing, .. }
            | Write::Connectivity { thing, .. }
            | Write::Telemetry { thing, .. }
            | Write::DeleteThing(thing) => Some(thing),
            Write::Thing(r) => Some(&r.id),
            Write::Command(c) => Some(&c.thing),
            Write::JobExecution(e) => Some(&e.thing),
            Write::Event(event) => Some(&event.thing),
            Write::Job(_) => None,
        }
    }
}

/// One numeric telemetry reading. A point of the same thing, key and millisecond
/// replaces it (a device's resent message is not counted twice).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub key: String,
    /// Milliseconds since the epoch.
    pub at: u64,
    pub value: f64,
}

/// A registered twin as the fleet index needs it, from [`IndexSource::index_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedTwin {
    pub record: ThingRecord,
    pub connectivity: Connectivity,
    pub shadows: Vec<(ShadowName, Shadow)>,
    pub telemetry: Latest,
}

/// A page of the fleet index's source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexPage {
    pub twins: Vec<IndexedTwin>,
    /// Where the next page starts: the last thing listed, whether or not it is in `twins`
    /// (a listed thing whose rows are corrupt, or that was never registered, is skipped
    /// with a warning); `None` once the partition is read.
    pub next: Option<DeviceId>,
}

/// A pending deadline: a command or job execution of `thing` (`item` names which) that
/// times out at `at` (milliseconds) unless it ends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    pub thing: DeviceId,
    pub item: String,
    pub at: u64,
}

/// How many executions of a job have each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts([u64; JobStatus::ALL.len()]);

impl JobCounts {
    pub fn add(&mut self, status: JobStatus) {
        self.0[status as usize] += 1;
    }

    pub fn get(&self, status: JobStatus) -> u64 {
        self.0[status as usize]
    }

    /// Executions created so far (every status).
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// A twin's own state: what a twin loads when it wakes and commits when it changes.
///
/// `commit` is atomic per twin (all of a twin's writes in the batch, or none of them) and
/// per job definition, and returns only once the whole batch is durable. Writes of
/// different twins may land independently: a network database's atomicity ends at a
/// partition. An error means an unknown outcome for the batch; the twins that made it
/// keep their state from before and reload from the store when they next wake.
#[async_trait]
pub trait TwinStateStore: Send + Sync + 'static {
    /// A twin's registry record, presence, shadows, pending commands and job executions.
    async fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError>;

    /// Writes a batch (see the trait's docs for what is atomic); returns once durable.
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError>;

    /// A shadow's retained changes, each with the shadow it produced, newest first: at
    /// most `limit` of them, those placed before `before` (a
    /// [`position`](twin_model::history::position)) when it is given.
    async fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;
}

/// The device registry.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    async fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError>;

    /// Registered things, a page at a time, resuming after `after`, in an order the
    /// backend keeps stable (id order on the embedded store; placement partition, then id,
    /// on ScyllaDB).
    async fn things(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<ThingRecord>, StoreError>;
}

/// Command executions, ended ones included.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// A command execution by its id (ids are unique across the fleet).
    async fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError>;

    /// A thing's command executions, newest first, starting before the execution id
    /// `before` (execution ids sort in creation order).
    async fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, StoreError>;
}

/// Job definitions and the status of each of their executions.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    async fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError>;

    /// Job definitions in id order, starting after `after`.
    async fn jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, StoreError>;

    /// The execution status of a job's targets, a page at a time, resuming after the thing
    /// `after`, in an order the backend keeps stable. A deleted thing keeps the status its
    /// execution ended with.
    async fn job_statuses(
        &self,
        job_id: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError>;

    /// How many of the job's executions have each status.
    async fn job_counts(&self, job_id: &str) -> Result<JobCounts, StoreError>;
}

/// The pending deadlines of commands and job executions, kept with every write of one, so
/// that a starting node finds them without reading every execution.
#[async_trait]
pub trait DeadlineIndex: Send + Sync + 'static {
    /// The pending deadlines of the things of `partition`, in (thing, item) order,
    /// starting after `after`.
    async fn pending_deadlines(
        &self,
        partition: u16,
        after: Option<(&DeviceId, &str)>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError>;
}

/// Where the fleet index comes from at start, one partition at a time.
#[async_trait]
pub trait IndexSource: Send + Sync + 'static {
    /// The registered things of `partition` with their presence and shadows, in an order
    /// the backend keeps (id order embedded; token order on ScyllaDB, where a partition is
    /// one token range), starting after `after` (at most `limit` things listed). A thing
    /// whose rows do not decode is reported with its key and skipped, never a failed start.
    async fn index_page(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<IndexPage, StoreError>;
}

/// A registered CA: device certificates it issued may be registered on their first
/// connection (`auto_registration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaRecord {
    pub id: CertificateId,
    /// The CA certificate, PEM.
    pub pem: String,
    pub status: CertificateStatus,
    pub auto_registration: bool,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

/// Registered device certificates, and the CAs registered for them.
#[async_trait]
pub trait CertificateStore: Send + Sync + 'static {
    /// Writes a certificate's record (its id is the key); returns once durable.
    async fn put_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError>;

    async fn certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateRecord>, StoreError>;

    /// Certificates, a page at a time, resuming after `after`, in an order the backend
    /// keeps stable (id order on the embedded store, token order on ScyllaDB).
    async fn certificates(
        &self,
        after: Option<&CertificateId>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Writes a CA's record (its id is the key); returns once durable.
    async fn put_ca_certificate(&self, record: &CaRecord) -> Result<(), StoreError>;

    /// Every registered CA (a fleet has a few).
    async fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError>;

    /// Writes a provisioning template (its name is the key); returns once durable.
    async fn put_template(&self, template: &ProvisioningTemplate) -> Result<(), StoreError>;

    /// Every provisioning template (a fleet has a few).
    async fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError>;
}

/// The audit log's entries (see [`audit`]), by sequence number.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends an entry unless one with its `seq` exists (another writer appended first:
    /// `false`); returns once durable. A conditional write, so that writers in several
    /// processes (the CLI beside a server, several nodes) never overwrite each other.
    async fn append_audit(&self, entry: &audit::AuditEntry) -> Result<bool, StoreError>;

    /// Writes an entry whatever is there (restoring a log from a copy); the log itself
    /// only appends.
    async fn put_audit(&self, entry: &audit::AuditEntry) -> Result<(), StoreError>;

    /// Entries in sequence order, after `after`.
    async fn audit_entries(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<audit::AuditEntry>, StoreError>;

    /// The newest entry.
    async fn last_audit(&self) -> Result<Option<audit::AuditEntry>, StoreError>;
}

/// Routes, their outbox, cursors and delivery logs (see [`routes`]).
#[async_trait]
pub trait RouteStore: Send + Sync + 'static {
    /// Writes a route (its id is the key); returns once durable.
    async fn put_route(&self, route: &routes::RouteRecord) -> Result<(), StoreError>;

    /// Removes a route with its cursor and delivery log.
    async fn delete_route(&self, id: &str) -> Result<(), StoreError>;

    /// Every route (a fleet has a few).
    async fn routes(&self) -> Result<Vec<routes::RouteRecord>, StoreError>;

    /// Outbox events after `after`, in position order: at most `limit`.
    async fn outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, routes::OutboxRecord)>, StoreError>;

    /// The position of the newest event in the outbox (0: none ever).
    async fn outbox_end(&self) -> Result<u64, StoreError>;

    /// Writes a route's cursor: every event at or before `position` is done.
    async fn put_cursor(&self, route: &str, position: u64) -> Result<(), StoreError>;

    async fn cursor(&self, route: &str) -> Result<Option<u64>, StoreError>;

    async fn put_deliveries(&self, deliveries: &[routes::DeliveryRecord])
    -> Result<(), StoreError>;

    /// A route's delivery log, newest first, starting before `before`.
    async fn deliveries(
        &self,
        route: &str,
        before: Option<routes::DeliveryKey>,
        limit: usize,
    ) -> Result<Vec<routes::DeliveryRecord>, StoreError>;

    /// Drops outbox events written before `events_before` (milliseconds), delivered or
    /// not, and delivery records older than `deliveries_before`. Returns how many
    /// records went.
    async fn prune_routes(
        &self,
        events_before: u64,
        deliveries_before: u64,
    ) -> Result<u64, StoreError>;
}

/// Telemetry series (the latest values are part of the twin: [`TwinSnapshot::telemetry`]).
#[async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// `series` filled with the thing's readings of `key` in its range.
    async fn telemetry_series(
        &self,
        thing: &DeviceId,
        key: &str,
        series: Series,
    ) -> Result<Series, StoreError>;

    /// Drops readings older than `before` (milliseconds; a whole day at a time, so some
    /// may stay up to a day longer). Returns how many days of readings went; a store
    /// whose readings expire by themselves (ScyllaDB's TTL) returns 0.
    async fn prune_telemetry(&self, before: u64) -> Result<u64, StoreError>;
}

/// A whole backend: every part above, and a flush at shutdown. Callers that need one part
/// take it alone (`Arc<dyn TwinStore>` coerces to `Arc<dyn JobStore>` and the others).
#[async_trait]
pub trait TwinStore:
    TwinStateStore
    + RegistryStore
    + CertificateStore
    + AuditStore
    + RouteStore
    + TelemetryStore
    + CommandStore
    + JobStore
    + DeadlineIndex
    + IndexSource
{
    /// Makes everything written so far durable (at shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
}

/// API tokens kept in the database, so that every node of a cluster shares them (the
/// ScyllaDB store; the embedded store's server keeps them in a file of its data directory).
/// Records are opaque here: the API owns their format.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Writes a token's record (its id is the key); returns once durable.
    async fn put_token(&self, id: &str, record: &str) -> Result<(), StoreError>;

    /// Every token's `(id, record)`.
    async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError>;
}

/// A listed thing as the index gets it: `None`, with a warning, when its rows are corrupt
/// or it is not registered (never acknowledged); other errors fail the read.
pub(crate) fn indexed(
    thing: &DeviceId,
    loaded: Result<TwinSnapshot, StoreError>,
) -> Result<Option<IndexedTwin>, StoreError> {
    match loaded {
        Ok(TwinSnapshot {
            record: Some(record),
            connectivity,
            shadows,
            telemetry,
            ..
        }) => Ok(Some(IndexedTwin {
            record,
            connectivity,
            shadows,
            telemetry,
        })),
        Ok(_) => {
            tracing::warn!(%thing, "listed in its partition but not registered; skipped");
            Ok(None)
        }
        Err(StoreError::Corrupt { key, reason }) => {
            tracing::warn!(%thing, key, reason, "a twin's stored rows are corrupt; it is left out of the fleet index");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl ThingRecord {
    /// A new, enabled thing and its secret (returned once, never stored).
    pub fn new(id: DeviceId, now_millis: u64) -> Result<(Self, String), StoreError> {
        let secret = secret::generate()?;
        let record = Self {
            id,
            secret_hash: secret::hash(&secret),
            enabled: true,
            created_at: now_millis,
            attributes: Map::new(),
            certificates: Vec::new(),
        };
        Ok((record, secret))
    }
}

/// Milliseconds since the epoch, for callers outside the pure model.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
