//! Doppel's persistence.
//!
//! - [`TwinStore`]: what the twins need from a database (load a twin, commit a batch of
//!   changes atomically and durably, event history, the device registry);
//! - [`embedded::EmbeddedStore`]: the default backend, fjall on local disk;
//! - [`committer::Committer`]: group commit, so that many twins' changes share one
//!   durable write;
//! - [`conformance`] (feature `test-util`): the suite every backend passes.
//!
//! The trait is synchronous: embedded engines block on disk. Callers on an async runtime
//! go through the committer (its own thread) or `spawn_blocking`.

pub mod committer;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod embedded;
pub mod secret;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twin_model::command::CommandExecution;
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
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
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the store is shutting down")]
    Closed,
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
}

/// One stored record, as [`TwinStore::scan`] visits them.
#[derive(Debug, Clone)]
pub enum Scanned {
    Thing(ThingRecord),
    Presence(DeviceId, Connectivity),
    Shadow(DeviceId, ShadowName, Box<Shadow>),
    /// A deadline of one of the thing's pending commands or running job executions.
    Deadline(DeviceId, u64),
}

pub trait TwinStore: Send + Sync + 'static {
    /// Loads a twin's registry record, presence and shadows.
    fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError>;

    /// Writes a batch atomically; returns only once it is durable.
    fn commit(&self, batch: &[Write]) -> Result<(), StoreError>;

    /// The newest `limit` changes of a shadow, oldest first.
    fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        limit: usize,
    ) -> Result<Vec<ShadowChange>, StoreError>;

    fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError>;

    fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError>;

    /// Job definitions in id order, starting after `after`.
    fn jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<JobDefinition>, StoreError>;

    /// Every execution status of a job, by thing.
    fn job_statuses(&self, job_id: &str) -> Result<Vec<(DeviceId, JobStatus)>, StoreError>;

    /// A command execution by its id (ids are unique across the fleet).
    fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError>;

    /// A thing's command executions, newest first, starting before the execution id
    /// `before` (execution ids sort in creation order).
    fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, StoreError>;

    /// Registered things in id order, starting after `after`.
    fn things(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<ThingRecord>, StoreError>;

    /// Visits every registry record, then every presence, then every shadow (at start,
    /// to build the fleet index).
    fn scan(&self, visit: &mut dyn FnMut(Scanned)) -> Result<(), StoreError>;

    /// Flushes everything to disk (at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
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
