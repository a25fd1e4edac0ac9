//! The ScyllaDB backend (tested on Apache Cassandra 5.0, which speaks the same CQL): the
//! [`TwinStore`] traits over the `scylla` driver, with prepared statements whose
//! partition key is bound, so that the driver routes each to its replicas and shards.
//!
//! The data model is in [`schema`]. A twin's own rows share one partition, so its part of
//! a commit is one single-partition batch: atomic and isolated, as the
//! [`TwinStateStore`] contract asks, without a logged batch. The listings kept beside it
//! (members, deadlines, command ids, job targets) are written before the twin's
//! batch and removed after it, so that a crash between the two leaves an extra listing
//! entry (which readers skip or which wakes a twin for nothing), never a missing one.
//! Many twins' parts of one commit are written at once: the network round trip, not an
//! fsync here, is the cost.

pub mod schema;
mod tls;

pub use scylla::statement::Consistency;

/// The replication of a keyspace created without one: a single replica, for development.
pub const SINGLE_REPLICA: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use futures_util::future::{join_all, try_join_all};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::serialize::row::SerializeRow;
use scylla::statement::SerialConsistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use serde::de::DeserializeOwned;
use twin_model::certificate::CertificateId;
use twin_model::command::CommandExecution;
use twin_model::history::HistoryEntry;
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::telemetry::{Latest, Series};
use twin_model::{ChangeOp, Connectivity, DeviceId, ShadowName};

use crate::audit::AuditEntry;
use crate::routes::{DeliveryKey, DeliveryRecord, OutboxRecord, RouteRecord};
use crate::{
    AuditStore, CaRecord, CertificateRecord, CertificateStore, CommandStore, Deadline,
    DeadlineIndex, IndexPage, IndexSource, JobCounts, JobStore, Refused, RegistryStore, RouteStore,
    StoreError, TelemetryStore, ThingRecord, TokenStore, TwinSnapshot, TwinStateStore, TwinStore,
    Write,
};
use schema::kind;
pub use tls::ScyllaTls;

/// How to reach the database and what to keep there.
#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    /// `host:port` of one or more nodes (the driver finds the others).
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The keyspace's replication, a CQL map, used when the keyspace is created.
    pub replication: String,
    /// Consistency of every read and write; a write is acknowledged at this level.
    pub consistency: Consistency,
    /// User name and password, for a database with password authentication.
    pub credentials: Option<(String, String)>,
    /// TLS to the nodes; `None`: plain TCP.
    pub tls: Option<ScyllaTls>,
    /// Changes kept per shadow.
    pub history: u64,
    /// How long a change is kept (a TTL on its row); `None` keeps it until trimmed.
    pub history_retention: Option<Duration>,
    /// How long a telemetry reading is kept (a TTL on its row).
    pub telemetry_retention: Duration,
    /// How long route events and delivery records are kept (a TTL on their rows).
    pub route_retention: Duration,
    /// Longest wait for one request.
    pub request_timeout: Duration,
}

impl ScyllaConfig {
    /// A single-node test or development setup: replication factor 1, `LOCAL_QUORUM`.
    pub fn single_node(nodes: Vec<String>, keyspace: &str, history: u64) -> Self {
        Self {
            nodes,
            keyspace: keyspace.to_owned(),
            replication: SINGLE_REPLICA.into(),
            consistency: Consistency::LocalQuorum,
            credentials: None,
            tls: None,
            history,
            history_retention: None,
            telemetry_retention: Duration::from_secs(7 * 86_400),
            route_retention: Duration::from_secs(7 * 86_400),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Every statement the store runs, prepared once.
struct Statements {
    load: PreparedStatement,
    /// The rows the fleet index needs (presence, record, shadow: the last kinds in
    /// clustering order) of a token range.
    index_scan: PreparedStatement,
    drop_members: PreparedStatement,
    drop_deadlines: PreparedStatement,
    /// Every row a listing is made from (schema upgrades only).
    listing_scan: PreparedStatement,
    row: PreparedStatement,
    put_token: PreparedStatement,
    tokens: PreparedStatement,
    put_certificate: PreparedStatement,
    certificate: PreparedStatement,
    certificates: PreparedStatement,
    certificates_after: PreparedStatement,
    put_ca: PreparedStatement,
    put_template: PreparedStatement,
    templates: PreparedStatement,
    cas: PreparedStatement,
    put_audit: PreparedStatement,
    append_audit: PreparedStatement,
    audit_first: PreparedStatement,
    audit_after: PreparedStatement,
    audit_last: PreparedStatement,
    put_row: PreparedStatement,
    /// A twin's rows but its `events` row (two range deletes, before and after it).
    delete_twin_before: PreparedStatement,
    delete_twin_between: PreparedStatement,
    delete_twin_after: PreparedStatement,
    fence_raise: PreparedStatement,
    fence_create: PreparedStatement,
    fence_check: PreparedStatement,
    put_event: PreparedStatement,
    events: PreparedStatement,
    last_event: PreparedStatement,
    put_outbox_end: PreparedStatement,
    outbox_end: PreparedStatement,
    put_route: PreparedStatement,
    delete_route: PreparedStatement,
    routes: PreparedStatement,
    put_cursor: PreparedStatement,
    cursor: PreparedStatement,
    delete_cursor: PreparedStatement,
    put_delivery: PreparedStatement,
    deliveries: PreparedStatement,
    deliveries_before: PreparedStatement,
    delete_deliveries: PreparedStatement,
    commands: PreparedStatement,
    commands_before: PreparedStatement,
    trim_history: PreparedStatement,
    put_point: PreparedStatement,
    points: PreparedStatement,
    delete_points: PreparedStatement,
    history: PreparedStatement,
    put_member: PreparedStatement,
    delete_member: PreparedStatement,
    members: PreparedStatement,
    members_after: PreparedStatement,
    put_deadline: PreparedStatement,
    delete_deadline: PreparedStatement,
    delete_deadlines: PreparedStatement,
    deadlines: PreparedStatement,
    deadlines_after: PreparedStatement,
    put_command_id: PreparedStatement,
    command_id: PreparedStatement,
    delete_command_id: PreparedStatement,
    put_job: PreparedStatement,
    job: PreparedStatement,
    put_job_id: PreparedStatement,
    job_ids: PreparedStatement,
    job_ids_after: PreparedStatement,
    put_target: PreparedStatement,
    targets: PreparedStatement,
    targets_after: PreparedStatement,
}

/// One write of a commit, in flight.
type Pending<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

pub struct ScyllaStore {
    session: Arc<Session>,
    keyspace: String,
    st: Arc<Statements>,
    history: u64,
    /// Seconds a change is kept (0: until trimmed).
    history_ttl: i32,
    /// Seconds a telemetry reading is kept.
    telemetry_ttl: i32,
    /// Seconds route events and delivery records are kept.
    route_ttl: i32,
    consistency: Consistency,
    /// The newest outbox position given out. Held while a batch with events is written:
    /// positions are given out, and written, one commit at a time.
    appending: tokio::sync::Mutex<u64>,
    /// What readers of the outbox may see.
    visible: std::sync::Mutex<Visible>,
    /// How long the positions of a batch whose outcome is unknown are held back from
    /// readers (see [`Visible`]).
    settle: Duration,
    /// Set on a cluster node: every twin write is conditional on its fence.
    fences: std::sync::OnceLock<Arc<dyn Fences>>,
}

/// The outbox positions readers see: those of commits that ended, so that a reader that
/// sees one position has seen every one before it (the rows of one commit land in
/// several partitions, in no set order).
///
/// A commit that failed has an unknown outcome: its logged batch may still be applied
/// (the database replays its batch log). Its positions are held back from readers for
/// [`ScyllaStore::settle`] (twice the request timeout, and the batch log's replay
/// interval), so that such an event is read in its place rather than skipped.
#[derive(Debug, Default)]
struct Visible {
    committed: u64,
    /// Readers see nothing after the position until the instant.
    hold: Option<(u64, std::time::Instant)>,
}

impl Visible {
    fn end(&mut self) -> u64 {
        match self.hold {
            Some((limit, until)) if std::time::Instant::now() < until => self.committed.min(limit),
            _ => {
                self.hold = None;
                self.committed
            }
        }
    }
}

/// More than the database takes to replay a batch from its log: Cassandra replays, every
/// 10 s, the batches older than twice its write timeout (2 s by default).
const BATCHLOG_REPLAY: Duration = Duration::from_secs(60);

/// A driver error as the store's: a statement the database refuses is an engine error
/// (a bug); anything else (no connection, a timeout, too few replicas) means the
/// database is unavailable, and a later retry may work.
fn engine(context: &str) -> impl FnOnce(scylla::errors::ExecutionError) -> StoreError + '_ {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    move |e| {
        let refused = match &e {
            ExecutionError::BadQuery(_) => true,
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
                db,
                DbError::SyntaxError
                    | DbError::Invalid
                    | DbError::AlreadyExists { .. }
                    | DbError::Unauthorized
                    | DbError::ConfigError
            ),
            _ => false,
        };
        if refused {
            StoreError::Engine(format!("{context}: {e}"))
        } else {
            StoreError::Unavailable(format!("{context}: {e}"))
        }
    }
}

fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    // Our records are plain data: serializing them cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn parse_thing(text: &str) -> Result<DeviceId, StoreError> {
    DeviceId::parse(text).map_err(|e| StoreError::Corrupt {
        key: text.to_owned(),
        reason: e.to_string(),
    })
}

/// The bucket of `job_targets` a thing falls in.
fn job_bucket(thing: &DeviceId) -> i32 {
    i32::from((thing.stable_hash() % u64::from(schema::JOB_BUCKETS)) as u16)
}

/// Which shards this node holds, and under which epoch: the cluster's leases, as the
/// store's fencing asks them (see [`ScyllaStore::fence_with`]).
pub trait Fences: Send + Sync {
    /// The epoch of this node's lease on placement partition `partition`; `None` when it
    /// holds none.
    fn epoch(&self, partition: u16) -> Option<u64>;
}

fn held(fences: &dyn Fences, thing: &DeviceId) -> Result<u64, StoreError> {
    let partition = thing.partition();
    fences.epoch(partition).ok_or_else(|| StoreError::Fenced {
        thing: thing.to_string(),
        reason: format!("this node does not hold its shard {partition}"),
    })
}

/// The error of a commit whose `fenced` twins were refused: [`StoreError::Fenced`] when
/// that was all of it and of one twin, else [`StoreError::FencedSome`] with the positions
/// of the refused writes.
fn refused(batch: &[Write], fenced: Vec<(DeviceId, StoreError)>) -> StoreError {
    let every = batch.iter().all(|w| w.thing() == Some(&fenced[0].0));
    if fenced.len() == 1 && every {
        return fenced.into_iter().next().expect("one").1;
    }
    StoreError::FencedSome(
        fenced
            .into_iter()
            .map(|(thing, e)| Refused {
                positions: (0..batch.len())
                    .filter(|&i| batch[i].thing() == Some(&thing))
                    .collect(),
                thing: thing.to_string(),
                reason: match e {
                    StoreError::Fenced { reason, .. } => reason,
                    other => other.to_string(),
                },
            })
            .collect(),
    )
}

/// An epoch as the fence row keeps it: text whose order is the numbers' order.
fn fence_text(epoch: u64) -> String {
    format!("{epoch:020}")
}

/// A conditional write's `[applied]`, and the `value` column of the row it found (when
/// the row exists; Cassandra returns it when the write was not applied, ScyllaDB always,
/// among the row's other columns: found by name).
pub fn conditional(
    result: scylla::response::query_result::QueryResult,
    what: &str,
) -> Result<(bool, Option<String>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: what.to_owned(),
        reason,
    };
    let result = result
        .into_rows_result()
        .map_err(|e| corrupt(e.to_string()))?;
    let specs = result.column_specs();
    let applied_at = specs.get_by_name("[applied]").map(|(i, _)| i);
    let value_at = specs.get_by_name("value").map(|(i, _)| i);
    let row = result
        .rows::<scylla::value::Row>()
        .map_err(|e| corrupt(e.to_string()))?
        .next()
        .transpose()
        .map_err(|e| corrupt(e.to_string()))?;
    let mut columns = row.map(|r| r.columns).unwrap_or_default();
    let mut take = |at: Option<usize>| at.and_then(|i| columns.get_mut(i)?.take());
    let applied = take(applied_at).and_then(|v| v.as_boolean());
    let found = take(value_at).and_then(|v| v.into_string());
    match applied {
        Some(applied) => Ok((applied, found)),
        None => Err(corrupt("a conditional write without [applied]".into())),
    }
}

/// Rows of a result as `T`, or a corrupt-data error naming the query.
pub fn rows<T>(
    result: scylla::response::query_result::QueryResult,
    what: &str,
) -> Result<Vec<T>, StoreError>
where
    T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
{
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt {
        key: what.to_owned(),
        reason: e.to_string(),
    };
    let rows = result.into_rows_result().map_err(|e| corrupt(&e))?;
    rows.rows::<T>()
        .map_err(|e| corrupt(&e))?
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| corrupt(&e))
}

impl ScyllaStore {
    /// Connects, creates the keyspace and tables when missing, and refuses a schema newer
    /// than this build knows.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        if !schema::valid_keyspace(&config.keyspace) {
            return Err(StoreError::Engine(format!(
                "scylla_keyspace {:?} is not a valid keyspace name (letters, digits and _, at most 48, not starting with a digit)",
                config.keyspace
            )));
        }
        let nodes = config.nodes.join(",");
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.request_timeout);
        if let Some((user, password)) = &config.credentials {
            builder = builder.user(user, password);
        }
        if let Some(tls) = &config.tls {
            builder = builder.tls_context(Some(tls::context(tls)?));
        }
        let session = builder
            .build()
            .await
            .map_err(|e| StoreError::Engine(format!("cannot reach ScyllaDB at {nodes}: {e}")))?;
        if config.replication == SINGLE_REPLICA {
            tracing::warn!(keyspace = %config.keyspace, "a keyspace created now keeps one replica of each row: set scylla_replication for production");
        }
        let ddl = |e: scylla::errors::ExecutionError| {
            StoreError::Engine(format!("cannot create the schema at {nodes}: {e}"))
        };
        // ScyllaDB puts a new keyspace on tablets, where (up to 2025.3 at least, its docs
        // say) it refuses lightweight transactions (the audit log's, a cluster's leases
        // and fences): a keyspace made here keeps vnodes. Only ScyllaDB has
        // `scylla_keyspaces`.
        let scylla = session
            .query_unpaged(
                "SELECT keyspace_name FROM system_schema.scylla_keyspaces LIMIT 1",
                (),
            )
            .await
            .is_ok();
        let mut create = schema::keyspace(&config.keyspace, &config.replication);
        if scylla {
            create.push_str(schema::WITHOUT_TABLETS);
        }
        session.query_unpaged(create, ()).await.map_err(ddl)?;
        for table in schema::tables(&config.keyspace) {
            session.query_unpaged(table, ()).await.map_err(ddl)?;
        }
        let ks = &config.keyspace;
        let found = session
            .query_unpaged(
                format!("SELECT version FROM {ks}.schema_version WHERE id = 0"),
                (),
            )
            .await
            .map_err(ddl)?;
        let found = rows::<(i32,)>(found, "schema_version")?
            .first()
            .map(|(v,)| *v);
        if let Some(v) = found
            && v > schema::VERSION
        {
            return Err(StoreError::Engine(format!(
                "the keyspace {ks} has schema version {v}, newer than this doppel knows ({}); upgrade doppel",
                schema::VERSION
            )));
        }
        let st = Statements::prepare(&session, ks, config)
            .await
            .map_err(|e| StoreError::Engine(format!("cannot prepare statements: {e}")))?;
        let store = Self {
            session: Arc::new(session),
            keyspace: config.keyspace.clone(),
            st: Arc::new(st),
            history: config.history.max(1),
            history_ttl: config.history_retention.map_or(0, ttl),
            telemetry_ttl: ttl(config.telemetry_retention),
            route_ttl: ttl(config.route_retention),
            consistency: config.consistency,
            appending: tokio::sync::Mutex::new(0),
            visible: std::sync::Mutex::new(Visible::default()),
            settle: config.request_timeout * 2 + BATCHLOG_REPLAY,
            fences: std::sync::OnceLock::new(),
        };
        if found != Some(schema::VERSION) {
            if let Some(v) = found
                && v < 3
            {
                store.rekey_listings().await?;
            }
            store
                .session
                .query_unpaged(
                    format!("INSERT INTO {ks}.schema_version (id, version) VALUES (0, ?)"),
                    (schema::VERSION,),
                )
                .await
                .map_err(ddl)?;
            if let Some(v) = found {
                tracing::info!(keyspace = %ks, from = v, to = schema::VERSION, "schema upgraded");
            }
        }
        let last = store.last_position().await?;
        *store.appending.lock().await = last;
        store.visible().committed = last;
        Ok(store)
    }

    /// The session, for the crates that keep tables of their own in the keyspace (shard
    /// leases).
    pub fn session(&self) -> Arc<Session> {
        self.session.clone()
    }

    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Schema 3 keys `members` and `deadlines` by placement partitions that are token
    /// ranges: an older keyspace's are dropped and made anew from the twins' rows.
    async fn rekey_listings(&self) -> Result<(), StoreError> {
        for partition in 0..twin_model::PARTITIONS {
            let p = i32::from(partition);
            self.exec(&self.st.drop_members, (p,)).await?;
            self.exec(&self.st.drop_deadlines, (p,)).await?;
        }
        let rows = self
            .scan::<(String, String, String, String), _>(
                &self.st.listing_scan,
                (),
                "rekeying listings",
            )
            .await?;
        let mut rows = std::pin::pin!(rows);
        // The listings' writes, a few hundred at once.
        let mut pending: Vec<Pending<'_>> = Vec::new();
        while let Some((thing, k, key, value)) = rows.try_next().await? {
            let id = parse_thing(&thing)?;
            let at = format!("{thing}/{k}/{key}");
            match k.as_str() {
                kind::RECORD => pending.push(Box::pin(
                    self.exec(&self.st.put_member, (i32::from(id.partition()), thing)),
                )),
                kind::COMMAND => {
                    let c: CommandExecution = decode(&at, &value)?;
                    pending.push(self.deadline(&id, format!("c{}", c.execution_id), c.deadline()));
                }
                kind::JOB => {
                    let e: JobExecution = decode(&at, &value)?;
                    pending.push(self.deadline(&id, format!("j{}", e.job_id), e.deadline()));
                }
                _ => {}
            }
            if pending.len() >= 256 {
                try_join_all(pending.drain(..)).await?;
            }
        }
        try_join_all(pending).await?;
        Ok(())
    }

    /// The rows of a statement read page by page ([`SCAN_PAGE`] rows a page), as a
    /// stream; `what` names the read in errors.
    async fn scan<T, V>(
        &self,
        statement: &PreparedStatement,
        values: V,
        what: &'static str,
    ) -> Result<impl futures_util::Stream<Item = Result<T, StoreError>> + use<T, V>, StoreError>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
        V: scylla::serialize::row::SerializeRow,
    {
        let mut statement = statement.clone();
        statement.set_page_size(SCAN_PAGE);
        let rows = self
            .session
            .execute_iter(statement, values)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{what}: {e}")))?
            .rows_stream::<T>()
            .map_err(|e| StoreError::Corrupt {
                key: what.into(),
                reason: e.to_string(),
            })?;
        Ok(rows.map_err(move |e| StoreError::Unavailable(format!("{what}: {e}"))))
    }

    async fn value_of(
        &self,
        thing: &DeviceId,
        kind: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.row, (thing.as_str(), kind, key))
            .await
            .map_err(engine("reading a twin"))?;
        Ok(rows::<(String,)>(result, "twin")?
            .into_iter()
            .next()
            .map(|(v,)| v))
    }

    /// A commit's writes, grouped: job definitions, then each thing's writes and events.
    async fn commit_things(
        &self,
        jobs: Vec<Arc<JobDefinition>>,
        by_thing: HashMap<DeviceId, Vec<&Write>>,
        events: HashMap<DeviceId, Vec<(u64, &OutboxRecord)>>,
        last: u64,
    ) -> Result<Vec<(DeviceId, StoreError)>, StoreError> {
        if self.fences.get().is_some() && !events.is_empty() {
            return Err(StoreError::Engine(
                "routes are not supported on a clustered ScyllaDB store yet".into(),
            ));
        }
        // Job definitions first: the executions that follow in the batch refer to them.
        try_join_all(jobs.iter().map(|job| async move {
            self.exec(&self.st.put_job, (job.job_id.clone(), encode(&**job)))
                .await?;
            self.exec(&self.st.put_job_id, (job.job_id.clone(),)).await
        }))
        .await?;
        // Every twin's batch runs to its end (none is left in flight to land later), each
        // conditional on its own fence: a twin another node holds now is refused alone.
        let events = &events;
        let written = join_all(by_thing.iter().map(|(thing, writes)| async move {
            let fence = match self.fences.get() {
                Some(fences) => Some(fence_text(held(&**fences, thing)?)),
                None => None,
            };
            let events = events.get(thing).map_or(&[][..], Vec::as_slice);
            self.commit_thing(thing, writes.clone(), events, last, fence.as_ref())
                .await
        }))
        .await;
        let mut fenced = Vec::new();
        for (thing, result) in by_thing.into_keys().zip(written) {
            match result {
                Ok(()) => {}
                Err(e @ StoreError::Fenced { .. }) => fenced.push((thing, e)),
                Err(e) => return Err(e),
            }
        }
        Ok(fenced)
    }

    /// One thing's writes of a commit, in order, and its events at their positions (the
    /// commit's newest being `last`).
    async fn commit_thing(
        &self,
        thing: &DeviceId,
        writes: Vec<&Write>,
        events: &[(u64, &OutboxRecord)],
        last: u64,
        fence: Option<&String>,
    ) -> Result<(), StoreError> {
        let mut pending: Vec<&Write> = Vec::new();
        for w in writes {
            if let Write::DeleteThing(_) = w {
                // What came before the delete is deleted with it.
                pending.clear();
                self.delete_thing(thing, fence.map(String::as_str)).await?;
            } else {
                pending.push(w);
            }
        }
        if pending.is_empty() && events.is_empty() {
            return Ok(());
        }
        // Listings first, then the twin's partition in one batch.
        let mut listings: Vec<Pending<'_>> = Vec::new();
        let mut trims: Vec<(String, String)> = Vec::new();
        let mut rows: Vec<(String, &'static str, String, String)> = Vec::new();
        for w in pending {
            match w {
                Write::Shadow {
                    shadow,
                    state,
                    change,
                    ..
                } => {
                    // The change goes into the twin's partition, in the same batch: one
                    // write, atomic with the state it produced.
                    let delete = matches!(change.op, ChangeOp::Delete);
                    // The state is serialized once, for its row and inside its entry.
                    let encoded = encode(&**state);
                    rows.push((
                        thing.to_string(),
                        kind::HISTORY,
                        history_key(shadow, change.version, delete),
                        String::from_utf8(HistoryEntry::encode_with(change, encoded.as_bytes()))
                            .expect("JSON is UTF-8"),
                    ));
                    if change.version % TRIM_EVERY == 0 && change.version > self.history {
                        trims.push(self.trim_range(shadow, change.version));
                    }
                    rows.push((
                        thing.to_string(),
                        kind::SHADOW,
                        shadow.key().to_owned(),
                        encoded,
                    ));
                }
                Write::Connectivity { connectivity, .. } => {
                    rows.push((
                        thing.to_string(),
                        kind::PRESENCE,
                        String::new(),
                        encode(connectivity),
                    ));
                }
                Write::Thing(record) => {
                    listings.push(Box::pin(self.exec(
                        &self.st.put_member,
                        (i32::from(thing.partition()), thing.to_string()),
                    )));
                    rows.push((
                        thing.to_string(),
                        kind::RECORD,
                        String::new(),
                        encode(record),
                    ));
                }
                Write::Command(c) => {
                    listings.push(Box::pin(self.exec(
                        &self.st.put_command_id,
                        (c.execution_id.clone(), thing.to_string()),
                    )));
                    listings.push(self.deadline(
                        thing,
                        format!("c{}", c.execution_id),
                        c.deadline(),
                    ));
                    rows.push((
                        thing.to_string(),
                        kind::COMMAND,
                        c.execution_id.clone(),
                        encode(&**c),
                    ));
                }
                Write::JobExecution(e) => {
                    listings.push(Box::pin(self.exec(
                        &self.st.put_target,
                        (
                            e.job_id.clone(),
                            job_bucket(thing),
                            thing.to_string(),
                            encode(&e.status),
                        ),
                    )));
                    listings.push(self.deadline(thing, format!("j{}", e.job_id), e.deadline()));
                    rows.push((thing.to_string(), kind::JOB, e.job_id.clone(), encode(&**e)));
                }
                Write::Telemetry { latest, points, .. } => {
                    // Readings before the latest values: a failed commit leaves readings
                    // that the device's resend writes again, at the same keys.
                    for p in points.iter() {
                        listings.push(Box::pin(self.exec(
                            &self.st.put_point,
                            (
                                thing.to_string(),
                                p.key.clone(),
                                day_number(p.at),
                                i64::try_from(p.at).unwrap_or(i64::MAX),
                                p.value,
                                self.telemetry_ttl,
                            ),
                        )));
                    }
                    rows.push((
                        thing.to_string(),
                        kind::TELEMETRY,
                        String::new(),
                        encode(&**latest),
                    ));
                }
                Write::Job(_) | Write::DeleteThing(_) | Write::Event(_) => {}
            }
        }
        if let Some((_, newest)) = events.last() {
            rows.push((
                thing.to_string(),
                kind::EVENTS,
                String::new(),
                newest.seq.to_string(),
            ));
        }
        try_join_all(listings).await?;
        // Alone, the twin's partition: an unlogged batch is atomic. With events, the
        // outbox's partitions too: a logged batch, which the database completes from its
        // batch log if its coordinator fails half-way. Fenced, a conditional batch on the
        // twin's fence (a lightweight transaction) that trims its history too.
        let mut values: Vec<Box<dyn SerializeRow + Send + Sync>> = Vec::new();
        let mut batch = if let Some(epoch) = fence {
            let mut batch = self.fenced_batch();
            batch.append_statement(self.st.fence_check.clone());
            values.push(Box::new((epoch.clone(), thing.to_string(), epoch.clone())));
            for (from, to) in trims.drain(..) {
                batch.append_statement(self.st.trim_history.clone());
                values.push(Box::new((thing.to_string(), from, to)));
            }
            batch
        } else {
            let mut batch = Batch::new(if events.is_empty() {
                BatchType::Unlogged
            } else {
                BatchType::Logged
            });
            batch.set_consistency(self.consistency);
            batch
        };
        // A change outlives its retention by age only until its TTL; other rows never
        // expire (TTL 0).
        for (thing, kind, key, value) in rows {
            let ttl = if kind == kind::HISTORY {
                self.history_ttl
            } else {
                0
            };
            batch.append_statement(self.st.put_row.clone());
            values.push(Box::new((thing, kind, key, value, ttl)));
        }
        for &(position, event) in events {
            let at = i64::try_from(position).unwrap_or(i64::MAX);
            batch.append_statement(self.st.put_event.clone());
            values.push(Box::new((
                bucket(position),
                at,
                encode(event),
                self.route_ttl,
            )));
        }
        if !events.is_empty() {
            batch.append_statement(self.st.put_outbox_end.clone());
            values.push(Box::new((i64::try_from(last).unwrap_or(i64::MAX),)));
        }
        if fence.is_some() {
            return self.fenced_write(thing, &batch, values).await;
        }
        let written = async {
            self.session
                .batch(&batch, values)
                .await
                .map(drop)
                .map_err(engine("writing a twin"))
        };
        let trimmed = try_join_all(
            trims
                .into_iter()
                .map(|(from, to)| self.trim(thing, from, to)),
        );
        let (written, trimmed) = futures_util::future::join(written, trimmed).await;
        written?;
        trimmed?;
        Ok(())
    }

    fn fenced_batch(&self) -> Batch {
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_consistency(self.consistency);
        batch.set_serial_consistency(Some(SerialConsistency::Serial));
        batch
    }

    /// Writes a conditional batch of `thing`'s partition whose condition is its fence.
    async fn fenced_write(
        &self,
        thing: &DeviceId,
        batch: &Batch,
        values: Vec<Box<dyn SerializeRow + Send + Sync>>,
    ) -> Result<(), StoreError> {
        let result = self
            .session
            .batch(batch, values)
            .await
            .map_err(engine("writing a twin"))?;
        let (applied, _) = conditional(result, thing.as_str())?;
        if applied {
            Ok(())
        } else {
            Err(StoreError::Fenced {
                thing: thing.to_string(),
                reason: "a node with a newer lease on its shard took it over".into(),
            })
        }
    }

    /// Raises `thing`'s fence to this node's epoch of its shard (before the twin is read,
    /// so that the read sees every write of the previous owner, and no write of the
    /// previous owner lands after it). Refused when a newer epoch fenced it first.
    async fn raise_fence(&self, thing: &DeviceId, fences: &dyn Fences) -> Result<(), StoreError> {
        let epoch = fence_text(held(fences, thing)?);
        let id = thing.to_string();
        // The row exists, or another node creates it between the two tries: then once more.
        for _ in 0..3 {
            let result = self
                .session
                .execute_unpaged(&self.st.fence_raise, (&epoch, &id, &epoch))
                .await
                .map_err(engine("fencing a twin"))?;
            let (applied, found) = conditional(result, &id)?;
            match found {
                _ if applied => return Ok(()),
                Some(found) if found == epoch => return Ok(()),
                Some(found) => {
                    return Err(StoreError::Fenced {
                        thing: id,
                        reason: format!(
                            "its shard's epoch {} here is older than the epoch {} that fenced it",
                            epoch.trim_start_matches('0'),
                            found.trim_start_matches('0')
                        ),
                    });
                }
                None => {
                    let result = self
                        .session
                        .execute_unpaged(&self.st.fence_create, (&id, &epoch))
                        .await
                        .map_err(engine("fencing a twin"))?;
                    if conditional(result, &id)?.0 {
                        return Ok(());
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "the fence of {id} kept changing while it was raised"
        )))
    }

    /// Makes every write of a twin conditional on its fence, from now on: this node
    /// writes a twin only while `fences` says it holds the twin's shard, and only if no
    /// node fenced the twin with a newer epoch since (see the `twin-cluster` crate).
    /// Refused once set.
    pub fn fence_with(&self, fences: Arc<dyn Fences>) -> Result<(), StoreError> {
        self.fences
            .set(fences)
            .map_err(|_| StoreError::Engine("the store is already fenced".into()))
    }

    fn exec<V>(
        &self,
        statement: &PreparedStatement,
        values: V,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + '_
    where
        V: scylla::serialize::row::SerializeRow + Send + Sync + 'static,
    {
        let statement = statement.clone();
        async move {
            self.session
                .execute_unpaged(&statement, values)
                .await
                .map(drop)
                .map_err(engine("writing a listing"))
        }
    }

    /// The history keys to delete at `version`: a shadow's changes older than the newest
    /// `history` versions (once every `TRIM_EVERY` versions: a range delete per change
    /// would double the writes).
    fn trim_range(&self, shadow: &ShadowName, version: u64) -> (String, String) {
        let oldest_kept = version.saturating_sub(self.history - 1);
        (
            history_key_prefix(shadow),
            history_key(shadow, oldest_kept, false),
        )
    }

    fn trim<'a>(&'a self, thing: &DeviceId, from: String, to: String) -> Pending<'a> {
        let thing = thing.to_string();
        Box::pin(async move {
            self.session
                .execute_unpaged(&self.st.trim_history, (thing, from, to))
                .await
                .map(drop)
                .map_err(engine("trimming history"))
        })
    }

    /// Keeps a deadline listed while it is pending, removes it once it is not.
    fn deadline<'a>(&'a self, thing: &DeviceId, item: String, at: Option<u64>) -> Pending<'a> {
        let partition = i32::from(thing.partition());
        let thing = thing.to_string();
        Box::pin(async move {
            let done = match at {
                Some(at) => {
                    let at = i64::try_from(at).unwrap_or(i64::MAX);
                    self.session
                        .execute_unpaged(&self.st.put_deadline, (partition, thing, item, at))
                        .await
                }
                None => {
                    self.session
                        .execute_unpaged(&self.st.delete_deadline, (partition, thing, item))
                        .await
                }
            };
            done.map(drop).map_err(engine("writing a deadline"))
        })
    }

    /// Removes the twin's partition first, then its listings (each job keeps the status
    /// the thing's execution ended with).
    async fn delete_thing(&self, thing: &DeviceId, fence: Option<&str>) -> Result<(), StoreError> {
        // What the twin's rows list, read before they go: its command ids and the keys of
        // its telemetry readings.
        let ids = self.all_command_ids(thing).await?;
        let keys = self.reading_keys(thing).await?;
        let ranges = [
            &self.st.delete_twin_before,
            &self.st.delete_twin_between,
            &self.st.delete_twin_after,
        ];
        if let Some(epoch) = fence {
            // One conditional batch: the ranges go only while the twin is still ours.
            let mut batch = self.fenced_batch();
            let mut values: Vec<Box<dyn SerializeRow + Send + Sync>> = Vec::new();
            batch.append_statement(self.st.fence_check.clone());
            values.push(Box::new((
                epoch.to_owned(),
                thing.to_string(),
                epoch.to_owned(),
            )));
            for statement in ranges {
                batch.append_statement(statement.clone());
                values.push(Box::new((thing.to_string(),)));
            }
            self.fenced_write(thing, &batch, values).await?;
        } else {
            for statement in ranges {
                self.session
                    .execute_unpaged(statement, (thing.as_str(),))
                    .await
                    .map_err(engine("deleting a twin"))?;
            }
        }
        // Then what listed or measured it: a failure from here on leaves rows that no
        // twin refers to (readings expire with their TTL).
        let partition = i32::from(thing.partition());
        let mut listings: Vec<Pending<'_>> = vec![
            Box::pin(self.exec(&self.st.delete_member, (partition, thing.to_string()))),
            Box::pin(self.exec(&self.st.delete_deadlines, (partition, thing.to_string()))),
        ];
        for id in ids {
            listings.push(Box::pin(self.exec(&self.st.delete_command_id, (id,))));
        }
        // The thing's telemetry readings: every day within retention of each key it has a
        // latest value of (a key it forgot keeps its readings until their TTL).
        let (first, last) = self.retained_days(0, u64::MAX);
        for key in keys {
            for day in first..=last {
                listings.push(Box::pin(self.exec(
                    &self.st.delete_points,
                    (thing.to_string(), key.clone(), day),
                )));
            }
        }
        try_join_all(listings).await?;
        Ok(())
    }

    /// The keys of the thing's latest telemetry values.
    async fn reading_keys(&self, thing: &DeviceId) -> Result<Vec<String>, StoreError> {
        let Some(latest) = self.value_of(thing, kind::TELEMETRY, "").await? else {
            return Ok(Vec::new());
        };
        let latest: Latest = decode(&format!("{thing}/telemetry"), &latest)?;
        Ok(latest.keys().map(str::to_owned).collect())
    }

    /// The days of `since` to `until` (milliseconds) that can still hold readings.
    fn retained_days(&self, since: u64, until: u64) -> (i32, i32) {
        let now = crate::now_millis();
        let oldest = now.saturating_sub(u64::from(self.telemetry_ttl.unsigned_abs()) * 1000);
        (
            day_number(since.max(oldest)),
            day_number(until.min(now + twin_model::telemetry::MAX_FUTURE_MS)),
        )
    }

    /// A twin's rows that `statement` selects (all of its own, or what the index needs).
    async fn load_with(
        &self,
        statement: &PreparedStatement,
        thing: &DeviceId,
    ) -> Result<TwinSnapshot, StoreError> {
        let result = self
            .session
            .execute_unpaged(statement, (thing.as_str(),))
            .await
            .map_err(engine("reading a twin"))?;
        snapshot_of(thing, rows::<(String, String, String)>(result, "twin")?)
    }

    /// A page of the things listed in a placement partition, in id order.
    async fn members(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit_: usize,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let p = i32::from(partition);
        let result = match after {
            Some(a) => {
                self.session
                    .execute_unpaged(&self.st.members_after, (p, a.as_str(), limit(limit_)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.members, (p, limit(limit_)))
                    .await
            }
        }
        .map_err(engine("reading members"))?;
        rows::<(String,)>(result, "members")?
            .into_iter()
            .map(|(t,)| parse_thing(&t))
            .collect()
    }

    async fn all_command_ids(&self, thing: &DeviceId) -> Result<Vec<String>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.load, (thing.as_str(),))
            .await
            .map_err(engine("reading a twin"))?;
        Ok(rows::<(String, String, String)>(result, "twin")?
            .into_iter()
            .filter(|(k, _, _)| k == kind::COMMAND)
            .map(|(_, key, _)| key)
            .collect())
    }
}

impl Statements {
    async fn prepare(
        session: &Session,
        ks: &str,
        config: &ScyllaConfig,
    ) -> Result<Self, scylla::errors::PrepareError> {
        let p = async |cql: String| -> Result<PreparedStatement, scylla::errors::PrepareError> {
            let mut s = session.prepare(cql).await?;
            s.set_consistency(config.consistency);
            // Lightweight transactions (the audit log's, the fences') across datacenters.
            s.set_serial_consistency(Some(SerialConsistency::Serial));
            s.set_request_timeout(Some(config.request_timeout));
            Ok(s)
        };
        Ok(Self {
            load: p(format!("SELECT kind, key, value FROM {ks}.twin WHERE thing = ? AND kind IN ('record', 'presence', 'shadow', 'command', 'job', 'telemetry', 'events')")).await?,
            drop_members: p(format!("DELETE FROM {ks}.members WHERE partition = ?")).await?,
            drop_deadlines: p(format!("DELETE FROM {ks}.deadlines WHERE partition = ?")).await?,
            listing_scan: p(format!("SELECT thing, kind, key, value FROM {ks}.twin")).await?,
            index_scan: p(format!("SELECT thing, kind, key, value FROM {ks}.twin WHERE token(thing) >= ? AND token(thing) <= ? AND kind >= 'presence' AND kind <= 'telemetry' ALLOW FILTERING")).await?,
            row: p(format!("SELECT value FROM {ks}.twin WHERE thing = ? AND kind = ? AND key = ?")).await?,
            put_token: p(format!("INSERT INTO {ks}.api_tokens (bucket, id, record) VALUES (0, ?, ?)")).await?,
            tokens: p(format!("SELECT id, record FROM {ks}.api_tokens WHERE bucket = 0")).await?,
            put_certificate: p(format!("INSERT INTO {ks}.certificates (id, record) VALUES (?, ?)")).await?,
            certificate: p(format!("SELECT record FROM {ks}.certificates WHERE id = ?")).await?,
            certificates: p(format!("SELECT record FROM {ks}.certificates LIMIT ?")).await?,
            certificates_after: p(format!("SELECT record FROM {ks}.certificates WHERE token(id) > token(?) LIMIT ?")).await?,
            put_ca: p(format!("INSERT INTO {ks}.ca_certificates (bucket, id, record) VALUES (0, ?, ?)")).await?,
            cas: p(format!("SELECT record FROM {ks}.ca_certificates WHERE bucket = 0")).await?,
            put_template: p(format!("INSERT INTO {ks}.provisioning_templates (bucket, name, record) VALUES (0, ?, ?)")).await?,
            templates: p(format!("SELECT record FROM {ks}.provisioning_templates WHERE bucket = 0")).await?,
            put_audit: p(format!("INSERT INTO {ks}.audit (bucket, seq, entry) VALUES (?, ?, ?)")).await?,
            append_audit: p(format!("INSERT INTO {ks}.audit (bucket, seq, entry) VALUES (?, ?, ?) IF NOT EXISTS")).await?,
            audit_first: p(format!("SELECT entry FROM {ks}.audit WHERE bucket = ? LIMIT ?")).await?,
            audit_after: p(format!("SELECT entry FROM {ks}.audit WHERE bucket = ? AND seq > ? LIMIT ?")).await?,
            audit_last: p(format!("SELECT entry FROM {ks}.audit WHERE bucket = ? ORDER BY seq DESC LIMIT 1")).await?,
            put_row: p(format!("INSERT INTO {ks}.twin (thing, kind, key, value) VALUES (?, ?, ?, ?) USING TTL ?")).await?,
            delete_twin_before: p(format!("DELETE FROM {ks}.twin WHERE thing = ? AND kind < 'events'")).await?,
            delete_twin_between: p(format!("DELETE FROM {ks}.twin WHERE thing = ? AND kind > 'events' AND kind < 'fence'")).await?,
            delete_twin_after: p(format!("DELETE FROM {ks}.twin WHERE thing = ? AND kind > 'fence'")).await?,
            fence_raise: p(format!("UPDATE {ks}.twin SET value = ? WHERE thing = ? AND kind = 'fence' AND key = '' IF value < ?")).await?,
            fence_create: p(format!("INSERT INTO {ks}.twin (thing, kind, key, value) VALUES (?, 'fence', '', ?) IF NOT EXISTS")).await?,
            fence_check: p(format!("UPDATE {ks}.twin SET value = ? WHERE thing = ? AND kind = 'fence' AND key = '' IF value = ?")).await?,
            put_event: p(format!("INSERT INTO {ks}.outbox (bucket, position, event) VALUES (?, ?, ?) USING TTL ?")).await?,
            events: p(format!("SELECT position, event FROM {ks}.outbox WHERE bucket = ? AND position > ? AND position <= ? LIMIT ?")).await?,
            last_event: p(format!("SELECT position FROM {ks}.outbox WHERE bucket = ? ORDER BY position DESC LIMIT 1")).await?,
            put_outbox_end: p(format!("INSERT INTO {ks}.outbox_end (id, position) VALUES (0, ?)")).await?,
            outbox_end: p(format!("SELECT position FROM {ks}.outbox_end WHERE id = 0")).await?,
            put_route: p(format!("INSERT INTO {ks}.routes (bucket, id, record) VALUES (0, ?, ?)")).await?,
            delete_route: p(format!("DELETE FROM {ks}.routes WHERE bucket = 0 AND id = ?")).await?,
            routes: p(format!("SELECT record FROM {ks}.routes WHERE bucket = 0")).await?,
            put_cursor: p(format!("INSERT INTO {ks}.route_cursors (route, position) VALUES (?, ?)")).await?,
            cursor: p(format!("SELECT position FROM {ks}.route_cursors WHERE route = ?")).await?,
            delete_cursor: p(format!("DELETE FROM {ks}.route_cursors WHERE route = ?")).await?,
            put_delivery: p(format!("INSERT INTO {ks}.route_deliveries (route, day, at, position, attempt, record) VALUES (?, ?, ?, ?, ?, ?) USING TTL ?")).await?,
            deliveries: p(format!("SELECT record FROM {ks}.route_deliveries WHERE route = ? AND day = ? LIMIT ?")).await?,
            deliveries_before: p(format!("SELECT record FROM {ks}.route_deliveries WHERE route = ? AND day = ? AND (at, position, attempt) < (?, ?, ?) LIMIT ?")).await?,
            delete_deliveries: p(format!("DELETE FROM {ks}.route_deliveries WHERE route = ? AND day = ?")).await?,
            put_point: p(format!("INSERT INTO {ks}.telemetry_points (thing, key, day, at, value) VALUES (?, ?, ?, ?, ?) USING TTL ?")).await?,
            points: p(format!("SELECT at, value FROM {ks}.telemetry_points WHERE thing = ? AND key = ? AND day = ? AND at >= ? AND at < ?")).await?,
            delete_points: p(format!("DELETE FROM {ks}.telemetry_points WHERE thing = ? AND key = ? AND day = ?")).await?,
            commands: p(format!("SELECT value FROM {ks}.twin WHERE thing = ? AND kind = 'command' ORDER BY kind DESC, key DESC LIMIT ?")).await?,
            commands_before: p(format!("SELECT value FROM {ks}.twin WHERE thing = ? AND kind = 'command' AND key < ? ORDER BY kind DESC, key DESC LIMIT ?")).await?,
            trim_history: p(format!("DELETE FROM {ks}.twin WHERE thing = ? AND kind = 'history' AND key >= ? AND key < ?")).await?,
            history: p(format!("SELECT value FROM {ks}.twin WHERE thing = ? AND kind = 'history' AND key >= ? AND key < ? ORDER BY kind DESC, key DESC LIMIT ?")).await?,
            put_member: p(format!("INSERT INTO {ks}.members (partition, thing) VALUES (?, ?)")).await?,
            delete_member: p(format!("DELETE FROM {ks}.members WHERE partition = ? AND thing = ?")).await?,
            members: p(format!("SELECT thing FROM {ks}.members WHERE partition = ? LIMIT ?")).await?,
            members_after: p(format!("SELECT thing FROM {ks}.members WHERE partition = ? AND thing > ? LIMIT ?")).await?,
            put_deadline: p(format!("INSERT INTO {ks}.deadlines (partition, thing, item, at) VALUES (?, ?, ?, ?)")).await?,
            delete_deadline: p(format!("DELETE FROM {ks}.deadlines WHERE partition = ? AND thing = ? AND item = ?")).await?,
            delete_deadlines: p(format!("DELETE FROM {ks}.deadlines WHERE partition = ? AND thing = ?")).await?,
            deadlines: p(format!("SELECT thing, item, at FROM {ks}.deadlines WHERE partition = ? LIMIT ?")).await?,
            deadlines_after: p(format!("SELECT thing, item, at FROM {ks}.deadlines WHERE partition = ? AND (thing, item) > (?, ?) LIMIT ?")).await?,
            put_command_id: p(format!("INSERT INTO {ks}.command_ids (execution_id, thing) VALUES (?, ?)")).await?,
            command_id: p(format!("SELECT thing FROM {ks}.command_ids WHERE execution_id = ?")).await?,
            delete_command_id: p(format!("DELETE FROM {ks}.command_ids WHERE execution_id = ?")).await?,
            put_job: p(format!("INSERT INTO {ks}.job (job_id, definition) VALUES (?, ?)")).await?,
            job: p(format!("SELECT definition FROM {ks}.job WHERE job_id = ?")).await?,
            put_job_id: p(format!("INSERT INTO {ks}.job_ids (bucket, job_id) VALUES (0, ?)")).await?,
            job_ids: p(format!("SELECT job_id FROM {ks}.job_ids WHERE bucket = 0 LIMIT ?")).await?,
            job_ids_after: p(format!("SELECT job_id FROM {ks}.job_ids WHERE bucket = 0 AND job_id > ? LIMIT ?")).await?,
            put_target: p(format!("INSERT INTO {ks}.job_targets (job_id, bucket, thing, status) VALUES (?, ?, ?, ?)")).await?,
            targets: p(format!("SELECT thing, status FROM {ks}.job_targets WHERE job_id = ? AND bucket = ? LIMIT ?")).await?,
            targets_after: p(format!("SELECT thing, status FROM {ks}.job_targets WHERE job_id = ? AND bucket = ? AND thing > ? LIMIT ?")).await?,
        })
    }
}

/// Rows per page of a partition's scan.
const SCAN_PAGE: i32 = 5000;

/// The longest TTL CQL accepts (20 years).
const MAX_TTL: u64 = 630_720_000;

/// A retention as a TTL in seconds (1 to [`MAX_TTL`]).
fn ttl(retention: Duration) -> i32 {
    i32::try_from(retention.as_secs().clamp(1, MAX_TTL)).unwrap_or(i32::MAX)
}

/// How often (in versions) a shadow's history is trimmed to `history` changes.
const TRIM_EVERY: u64 = 16;

/// Where a shadow's changes start among its twin's rows: `{shadow}/`.
fn history_key_prefix(shadow: &ShadowName) -> String {
    format!("{}/", shadow.key())
}

/// Just past a shadow's changes (`0` follows `/`; shadow names hold neither).
fn history_key_end(shadow: &ShadowName) -> String {
    format!("{}0", shadow.key())
}

/// A change's row key, in (version, delete after update) order.
fn history_key(shadow: &ShadowName, version: u64, delete: bool) -> String {
    format!("{}/{version:020}{}", shadow.key(), u8::from(delete))
}

/// A twin as its rows (kind, key, value) make it.
fn snapshot_of(
    thing: &DeviceId,
    found: impl IntoIterator<Item = (String, String, String)>,
) -> Result<TwinSnapshot, StoreError> {
    let mut snap = TwinSnapshot::default();
    for (k, key, value) in found {
        let at = format!("{thing}/{k}/{key}");
        match k.as_str() {
            kind::RECORD => snap.record = Some(decode(&at, &value)?),
            kind::PRESENCE => snap.connectivity = decode::<Connectivity>(&at, &value)?,
            kind::SHADOW => {
                let name = ShadowName::from_key(&key).map_err(|e| StoreError::Corrupt {
                    key: at.clone(),
                    reason: e.to_string(),
                })?;
                snap.shadows.push((name, decode(&at, &value)?));
            }
            kind::COMMAND => {
                let c: CommandExecution = decode(&at, &value)?;
                if !c.status.is_terminal() {
                    snap.pending_commands.push(c);
                }
            }
            kind::JOB => snap
                .job_executions
                .push(decode::<JobExecution>(&at, &value)?),
            kind::TELEMETRY => snap.telemetry = decode::<Latest>(&at, &value)?,
            kind::EVENTS => {
                snap.event_seq = value.parse().map_err(|_| StoreError::Corrupt {
                    key: at.clone(),
                    reason: "an event number is a decimal integer".into(),
                })?;
            }
            other => {
                tracing::warn!(%thing, kind = other, "unknown row kind in a twin's partition; skipped");
            }
        }
    }
    Ok(snap)
}

fn day_number(millis: u64) -> i32 {
    i32::try_from(twin_model::telemetry::day(millis)).unwrap_or(i32::MAX)
}

fn limit(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[async_trait]
impl TelemetryStore for ScyllaStore {
    async fn telemetry_series(
        &self,
        thing: &DeviceId,
        key: &str,
        mut series: Series,
    ) -> Result<Series, StoreError> {
        let (since, until) = series.range();
        let (first, last) = self.retained_days(since, until - 1);
        let bound = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        for day in first..=last {
            let rows = self
                .scan::<(i64, f64), _>(
                    &self.st.points,
                    (thing.as_str(), key, day, bound(since), bound(until)),
                    "reading telemetry",
                )
                .await?;
            let mut rows = std::pin::pin!(rows);
            while let Some((at, value)) = rows.try_next().await? {
                series.add(u64::try_from(at).unwrap_or(0), value);
            }
        }
        Ok(series)
    }

    /// Readings expire by their TTL.
    async fn prune_telemetry(&self, _: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[async_trait]
impl TwinStateStore for ScyllaStore {
    async fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        if let Some(fences) = self.fences.get() {
            self.raise_fence(thing, &**fences).await?;
        }
        self.load_with(&self.st.load, thing).await
    }

    /// A thing's events go into the logged batch of its twin's rows (atomic across the
    /// partitions, through the database's batch log), at positions given out here in the
    /// batch's order, one commit at a time.
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        let appending = if batch.iter().any(|w| matches!(w, Write::Event(_))) {
            Some(self.appending.lock().await)
        } else {
            None
        };
        let first = appending.as_deref().map_or(0, |last| last + 1);
        let mut next = first;
        let mut events: HashMap<DeviceId, Vec<(u64, &OutboxRecord)>> = HashMap::new();
        let mut by_thing: HashMap<DeviceId, Vec<&Write>> = HashMap::new();
        let mut jobs = Vec::new();
        for w in &batch {
            match w {
                Write::Event(event) => {
                    events
                        .entry(event.thing.clone())
                        .or_default()
                        .push((next, event));
                    by_thing.entry(event.thing.clone()).or_default();
                    next += 1;
                }
                Write::Job(job) => jobs.push(job.clone()),
                _ => {
                    let thing = w.thing().expect("every other write is of a thing");
                    by_thing.entry(thing.clone()).or_default().push(w);
                }
            }
        }
        // The newest position of the commit (unused without events).
        let last = next.saturating_sub(1);
        let written = match self.commit_things(jobs, by_thing, events, last).await {
            Ok(fenced) if fenced.is_empty() => Ok(()),
            Ok(fenced) => Err(refused(&batch, fenced)),
            Err(e) => Err(e),
        };
        if let Some(mut appending) = appending {
            // Given out whatever the outcome: a failed batch may still land.
            *appending = last;
            let mut visible = self.visible();
            visible.committed = last;
            if written.is_err() {
                let limit = visible.hold.map_or(first - 1, |(l, _)| l.min(first - 1));
                visible.hold = Some((limit, std::time::Instant::now() + self.settle));
            }
        }
        written
    }

    async fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit_: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        // The partition may hold up to TRIM_EVERY - 1 changes past the retained ones:
        // read the retained ones, then page among them.
        let result = self
            .session
            .execute_unpaged(
                &self.st.history,
                (
                    thing.as_str(),
                    history_key_prefix(shadow),
                    history_key_end(shadow),
                    limit(self.history as usize),
                ),
            )
            .await
            .map_err(engine("reading history"))?;
        let mut out = Vec::new();
        for (value,) in rows::<(String,)>(result, "twin history")? {
            let entry =
                HistoryEntry::decode(value.as_bytes()).map_err(|e| StoreError::Corrupt {
                    key: format!("{thing}/{shadow}"),
                    reason: e.to_string(),
                })?;
            if before.is_none_or(|b| entry.position() < b) {
                out.push(entry);
            }
        }
        out.truncate(limit_);
        Ok(out)
    }
}

#[async_trait]
impl TokenStore for ScyllaStore {
    async fn put_token(&self, id: &str, record: &str) -> Result<(), StoreError> {
        self.exec(&self.st.put_token, (id.to_owned(), record.to_owned()))
            .await
    }

    async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.scan(&self.st.tokens, (), "reading API tokens")
            .await?
            .try_collect()
            .await
    }
}

#[async_trait]
impl CertificateStore for ScyllaStore {
    async fn put_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Engine(format!("encoding a certificate: {e}")))?;
        self.exec(&self.st.put_certificate, (record.id.to_string(), json))
            .await
    }

    async fn certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.certificate, (id.as_str(),))
            .await
            .map_err(engine("reading a certificate"))?;
        rows::<(String,)>(result, "certificates")?
            .first()
            .map(|(v,)| decode(id.as_str(), v))
            .transpose()
    }

    /// In token order of the ids: one partition per certificate, so that a fleet's
    /// certificates spread over the cluster.
    async fn certificates(
        &self,
        after: Option<&CertificateId>,
        limit_: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let result = match after {
            Some(a) => {
                self.session
                    .execute_unpaged(&self.st.certificates_after, (a.as_str(), limit(limit_)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.certificates, (limit(limit_),))
                    .await
            }
        }
        .map_err(engine("listing certificates"))?;
        rows::<(String,)>(result, "certificates")?
            .iter()
            .map(|(v,)| decode("certificates", v))
            .collect()
    }

    async fn put_ca_certificate(&self, record: &CaRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Engine(format!("encoding a CA: {e}")))?;
        self.exec(&self.st.put_ca, (record.id.to_string(), json))
            .await
    }

    async fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError> {
        let rows: Vec<(String,)> = self
            .scan(&self.st.cas, (), "reading the registered CAs")
            .await?
            .try_collect()
            .await?;
        rows.iter()
            .map(|(v,)| decode("ca_certificates", v))
            .collect()
    }

    async fn put_template(&self, template: &ProvisioningTemplate) -> Result<(), StoreError> {
        let json = serde_json::to_string(template)
            .map_err(|e| StoreError::Engine(format!("encoding a template: {e}")))?;
        self.exec(&self.st.put_template, (template.name.clone(), json))
            .await
    }

    async fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError> {
        let rows: Vec<(String,)> = self
            .scan(&self.st.templates, (), "reading the provisioning templates")
            .await?
            .try_collect()
            .await?;
        rows.iter()
            .map(|(v,)| decode("provisioning_templates", v))
            .collect()
    }
}

/// Consecutive numbers per partition of the `audit` and `outbox` tables: the bucket of
/// `n` is `n / BUCKET`.
const BUCKET: u64 = 1 << 16;

fn bucket(n: u64) -> i64 {
    i64::try_from(n / BUCKET).unwrap_or(i64::MAX)
}

impl ScyllaStore {
    /// The entries of one bucket after `after`, at most `limit`.
    async fn audit_bucket(
        &self,
        bucket: i64,
        after: Option<u64>,
        limit_: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let result = match after {
            Some(a) => {
                let a = i64::try_from(a).unwrap_or(i64::MAX);
                self.session
                    .execute_unpaged(&self.st.audit_after, (bucket, a, limit(limit_)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.audit_first, (bucket, limit(limit_)))
                    .await
            }
        }
        .map_err(engine("reading the audit log"))?;
        rows::<(String,)>(result, "audit")?
            .iter()
            .map(|(v,)| decode("audit", v))
            .collect()
    }
}

impl ScyllaStore {
    fn visible(&self) -> std::sync::MutexGuard<'_, Visible> {
        self.visible.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest outbox position ever given out: `outbox_end`'s, or a later one that a
    /// commit wrote although its batch failed (in the bucket after, at most: a commit
    /// has fewer than [`BUCKET`] events).
    async fn last_position(&self) -> Result<u64, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.outbox_end, ())
            .await
            .map_err(engine("reading the outbox"))?;
        let end = rows::<(i64,)>(result, "outbox_end")?
            .first()
            .map_or(0, |(p,)| u64::try_from(*p).unwrap_or(0));
        let mut last = end;
        for b in [bucket(end), bucket(end) + 1] {
            let result = self
                .session
                .execute_unpaged(&self.st.last_event, (b,))
                .await
                .map_err(engine("reading the outbox"))?;
            if let Some((p,)) = rows::<(i64,)>(result, "outbox")?.first() {
                last = last.max(u64::try_from(*p).unwrap_or(0));
            }
        }
        Ok(last)
    }

    /// The days that can hold delivery records, newest first, from `from`'s.
    fn delivery_days(&self, from: u64) -> std::ops::RangeInclusive<i32> {
        let oldest =
            crate::now_millis().saturating_sub(u64::from(self.route_ttl.unsigned_abs()) * 1000);
        day_number(oldest)..=day_number(from)
    }
}

/// Routes on ScyllaDB: positions are given out by this process, one commit at a time
/// (see [`ScyllaStore::commit`]); events and delivery records expire by their TTL
/// (`route_retention`), so there is nothing to prune.
#[async_trait]
impl RouteStore for ScyllaStore {
    async fn put_route(&self, route: &RouteRecord) -> Result<(), StoreError> {
        self.exec(&self.st.put_route, (route.id.clone(), encode(route)))
            .await
    }

    async fn delete_route(&self, id: &str) -> Result<(), StoreError> {
        let mut pending: Vec<Pending<'_>> = vec![
            Box::pin(self.exec(&self.st.delete_route, (id.to_owned(),))),
            Box::pin(self.exec(&self.st.delete_cursor, (id.to_owned(),))),
        ];
        let today = crate::now_millis() + 86_400_000;
        for day in self.delivery_days(today) {
            pending.push(Box::pin(
                self.exec(&self.st.delete_deliveries, (id.to_owned(), day)),
            ));
        }
        try_join_all(pending).await?;
        Ok(())
    }

    async fn routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.routes, ())
            .await
            .map_err(engine("reading routes"))?;
        rows::<(String,)>(result, "routes")?
            .iter()
            .map(|(v,)| decode("routes", v))
            .collect()
    }

    /// Bucket by bucket, up to the newest position readers may see; a bucket whose
    /// events all expired is empty, and passed over.
    async fn outbox(
        &self,
        after: u64,
        limit_: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let end = self.visible().end();
        let mut out = Vec::new();
        let mut from = after;
        while out.len() < limit_ && from < end {
            // The bucket of the next position, to its last position (or `end`).
            let b = bucket(from + 1);
            let upto = end.min(((from + 1) / BUCKET + 1) * BUCKET - 1);
            let (lo, hi) = (
                i64::try_from(from).unwrap_or(i64::MAX),
                i64::try_from(upto).unwrap_or(i64::MAX),
            );
            let result = self
                .session
                .execute_unpaged(&self.st.events, (b, lo, hi, limit(limit_ - out.len())))
                .await
                .map_err(engine("reading the outbox"))?;
            for (position, event) in rows::<(i64, String)>(result, "outbox")? {
                let position = u64::try_from(position).unwrap_or(0);
                out.push((position, decode(&format!("outbox/{position}"), &event)?));
            }
            from = upto;
        }
        Ok(out)
    }

    async fn outbox_end(&self) -> Result<u64, StoreError> {
        Ok(self.visible().end())
    }

    async fn put_cursor(&self, route: &str, position: u64) -> Result<(), StoreError> {
        self.exec(
            &self.st.put_cursor,
            (
                route.to_owned(),
                i64::try_from(position).unwrap_or(i64::MAX),
            ),
        )
        .await
    }

    async fn cursor(&self, route: &str) -> Result<Option<u64>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.cursor, (route,))
            .await
            .map_err(engine("reading a route's cursor"))?;
        Ok(rows::<(i64,)>(result, "route_cursors")?
            .first()
            .map(|(p,)| u64::try_from(*p).unwrap_or(0)))
    }

    async fn put_deliveries(&self, deliveries: &[DeliveryRecord]) -> Result<(), StoreError> {
        try_join_all(deliveries.iter().map(|d| {
            self.exec(
                &self.st.put_delivery,
                (
                    d.route.clone(),
                    day_number(d.at),
                    i64::try_from(d.at).unwrap_or(i64::MAX),
                    i64::try_from(d.position).unwrap_or(i64::MAX),
                    i32::try_from(d.attempt).unwrap_or(i32::MAX),
                    encode(d),
                    self.route_ttl,
                ),
            )
        }))
        .await?;
        Ok(())
    }

    /// Day by day, newest first, back to the oldest day a record can still be kept.
    async fn deliveries(
        &self,
        route: &str,
        before: Option<DeliveryKey>,
        limit_: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let newest = before.map_or(crate::now_millis() + 86_400_000, |k| k.at);
        let mut out = Vec::new();
        for day in self.delivery_days(newest).rev() {
            if out.len() >= limit_ {
                break;
            }
            let want = limit(limit_ - out.len());
            let result = match before {
                Some(k) if day == day_number(k.at) => {
                    let key = (
                        i64::try_from(k.at).unwrap_or(i64::MAX),
                        i64::try_from(k.position).unwrap_or(i64::MAX),
                        i32::try_from(k.attempt).unwrap_or(i32::MAX),
                    );
                    self.session
                        .execute_unpaged(
                            &self.st.deliveries_before,
                            (route, day, key.0, key.1, key.2, want),
                        )
                        .await
                }
                _ => {
                    self.session
                        .execute_unpaged(&self.st.deliveries, (route, day, want))
                        .await
                }
            }
            .map_err(engine("reading a delivery log"))?;
            for (v,) in rows::<(String,)>(result, "route_deliveries")? {
                out.push(decode("route_deliveries", &v)?);
            }
        }
        Ok(out)
    }

    async fn prune_routes(&self, _: u64, _: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[async_trait]
impl AuditStore for ScyllaStore {
    /// A lightweight transaction (Paxos), so that two writers never both take a `seq`.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError> {
        let json = serde_json::to_string(entry)
            .map_err(|e| StoreError::Engine(format!("encoding an audit entry: {e}")))?;
        let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
        let result = self
            .session
            .execute_unpaged(&self.st.append_audit, (bucket(entry.seq), seq, json))
            .await
            .map_err(engine("appending to the audit log"))?;
        Ok(conditional(result, "audit")?.0)
    }

    async fn put_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let json = serde_json::to_string(entry)
            .map_err(|e| StoreError::Engine(format!("encoding an audit entry: {e}")))?;
        let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
        self.exec(&self.st.put_audit, (bucket(entry.seq), seq, json))
            .await
    }

    /// Bucket by bucket; the log has no gaps, so an empty bucket is its end.
    async fn audit_entries(
        &self,
        after: Option<u64>,
        limit_: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        let mut at = bucket(after.map_or(0, |a| a + 1));
        let mut cursor = after;
        while out.len() < limit_ {
            let page = self.audit_bucket(at, cursor, limit_ - out.len()).await?;
            let full = page.len() == limit_ - out.len();
            out.extend(page);
            if full {
                break;
            }
            if out.last().is_none_or(|e| bucket(e.seq + 1) == at) {
                break;
            }
            at += 1;
            cursor = None;
        }
        Ok(out)
    }

    async fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        let mut last = None;
        for bucket in 0_i64.. {
            let result = self
                .session
                .execute_unpaged(&self.st.audit_last, (bucket,))
                .await
                .map_err(engine("reading the audit log"))?;
            match rows::<(String,)>(result, "audit")?.first() {
                Some((v,)) => last = Some(decode("audit", v)?),
                None => break,
            }
        }
        Ok(last)
    }
}

#[async_trait]
impl RegistryStore for ScyllaStore {
    async fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        match self.value_of(thing, kind::RECORD, "").await? {
            Some(v) => Ok(Some(decode(thing.as_str(), &v)?)),
            None => Ok(None),
        }
    }

    /// In (placement partition, id) order: the cursor's partition is its own.
    async fn things(
        &self,
        after: Option<&DeviceId>,
        limit_: usize,
    ) -> Result<Vec<ThingRecord>, StoreError> {
        let mut out = Vec::new();
        let mut partition = after.map_or(0, DeviceId::partition);
        let mut cursor = after.cloned();
        while out.len() < limit_ && partition < twin_model::PARTITIONS {
            let want = limit_ - out.len();
            let page = self.members(partition, cursor.as_ref(), want).await?;
            if page.len() < want {
                partition += 1;
                cursor = None;
            } else {
                cursor = page.last().cloned();
            }
            for thing in page {
                // A member without its record was never acknowledged: skipped.
                if let Some(record) = self.thing(&thing).await? {
                    out.push(record);
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl CommandStore for ScyllaStore {
    async fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.command_id, (execution_id,))
            .await
            .map_err(engine("reading a command id"))?;
        let Some((thing,)) = rows::<(String,)>(result, "command_ids")?.into_iter().next() else {
            return Ok(None);
        };
        let thing = parse_thing(&thing)?;
        match self.value_of(&thing, kind::COMMAND, execution_id).await? {
            Some(v) => Ok(Some(decode(execution_id, &v)?)),
            None => Ok(None),
        }
    }

    async fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit_: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        let result = match before {
            Some(b) => {
                self.session
                    .execute_unpaged(&self.st.commands_before, (thing.as_str(), b, limit(limit_)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.commands, (thing.as_str(), limit(limit_)))
                    .await
            }
        }
        .map_err(engine("reading commands"))?;
        rows::<(String,)>(result, "twin")?
            .into_iter()
            .map(|(v,)| decode(thing.as_str(), &v))
            .collect()
    }
}

#[async_trait]
impl JobStore for ScyllaStore {
    async fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.st.job, (job_id,))
            .await
            .map_err(engine("reading a job"))?;
        match rows::<(String,)>(result, "job")?.into_iter().next() {
            Some((v,)) => Ok(Some(decode(job_id, &v)?)),
            None => Ok(None),
        }
    }

    async fn jobs(
        &self,
        after: Option<&str>,
        limit_: usize,
    ) -> Result<Vec<JobDefinition>, StoreError> {
        let result = match after {
            Some(a) => {
                self.session
                    .execute_unpaged(&self.st.job_ids_after, (a, limit(limit_)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.job_ids, (limit(limit_),))
                    .await
            }
        }
        .map_err(engine("listing jobs"))?;
        let mut out = Vec::new();
        for (id,) in rows::<(String,)>(result, "job_ids")? {
            // A listed id whose definition is missing (a crash between the two writes) is
            // skipped: the job was never acknowledged.
            if let Some(job) = self.job(&id).await? {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// In (target bucket, thing) order: the cursor's bucket is its own.
    async fn job_statuses(
        &self,
        job_id: &str,
        after: Option<&DeviceId>,
        limit_: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        let mut out = Vec::new();
        let mut bucket = after.map_or(0, job_bucket);
        let mut cursor = after.map(DeviceId::to_string);
        while out.len() < limit_ && bucket < i32::from(schema::JOB_BUCKETS) {
            let want = limit(limit_ - out.len());
            let result = match &cursor {
                Some(c) => {
                    self.session
                        .execute_unpaged(&self.st.targets_after, (job_id, bucket, c.as_str(), want))
                        .await
                }
                None => {
                    self.session
                        .execute_unpaged(&self.st.targets, (job_id, bucket, want))
                        .await
                }
            }
            .map_err(engine("reading job statuses"))?;
            let page = rows::<(String, String)>(result, "job_targets")?;
            let full = page.len() as i32 == want;
            cursor = page.last().map(|(t, _)| t.clone());
            for (thing, status) in page {
                out.push((parse_thing(&thing)?, decode(job_id, &status)?));
            }
            if !full {
                bucket += 1;
                cursor = None;
            }
        }
        Ok(out)
    }

    async fn job_counts(&self, job_id: &str) -> Result<JobCounts, StoreError> {
        let mut counts = JobCounts::default();
        let mut after: Option<DeviceId> = None;
        loop {
            let page = self.job_statuses(job_id, after.as_ref(), 5000).await?;
            let Some((last, _)) = page.last() else {
                return Ok(counts);
            };
            after = Some(last.clone());
            for (_, status) in page {
                counts.add(status);
            }
        }
    }
}

#[async_trait]
impl DeadlineIndex for ScyllaStore {
    async fn pending_deadlines(
        &self,
        partition: u16,
        after: Option<(&DeviceId, &str)>,
        limit_: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        let p = i32::from(partition);
        let result = match after {
            Some((thing, item)) => {
                self.session
                    .execute_unpaged(
                        &self.st.deadlines_after,
                        (p, thing.as_str(), item, limit(limit_)),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.st.deadlines, (p, limit(limit_)))
                    .await
            }
        }
        .map_err(engine("reading deadlines"))?;
        rows::<(String, String, i64)>(result, "deadlines")?
            .into_iter()
            .map(|(thing, item, at)| {
                Ok(Deadline {
                    thing: parse_thing(&thing)?,
                    item,
                    at: u64::try_from(at).unwrap_or(0),
                })
            })
            .collect()
    }
}

#[async_trait]
impl IndexSource for ScyllaStore {
    /// One scan of the partition's token range (placement partitions are token ranges),
    /// reading only the rows the index needs: far cheaper for the database than a read
    /// per thing. Things come in token order; `after` resumes after that thing.
    async fn index_page(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit_: usize,
    ) -> Result<IndexPage, StoreError> {
        let (first, last) = twin_model::partition_tokens(partition);
        let from = after.map_or(first, DeviceId::token);
        let rows = self
            .scan::<(String, String, String, String), _>(
                &self.st.index_scan,
                (from, last),
                "scanning a placement partition",
            )
            .await?;
        let mut rows = std::pin::pin!(rows);
        let mut page = IndexPage::default();
        let mut current: Option<(String, Vec<(String, String, String)>)> = None;
        let finish = |thing: String, found: Vec<(String, String, String)>, page: &mut IndexPage| {
            let id = parse_thing(&thing)?;
            if let Some(twin) = crate::indexed(&id, snapshot_of(&id, found))? {
                page.twins.push(twin);
            }
            page.next = Some(id);
            Ok::<_, StoreError>(())
        };
        while let Some((thing, kind, key, value)) = rows.try_next().await? {
            // Resuming: the things up to `after` (in token order, then id) were answered.
            if let Some(a) = after {
                let id = parse_thing(&thing)?;
                if id.token() == a.token() && thing.as_str() <= a.as_str() {
                    continue;
                }
            }
            match &mut current {
                Some((t, found)) if *t == thing => found.push((kind, key, value)),
                _ => {
                    if let Some((t, found)) = current.take() {
                        finish(t, found, &mut page)?;
                        if page.twins.len() >= limit_ {
                            return Ok(page);
                        }
                    }
                    current = Some((thing, vec![(kind, key, value)]));
                }
            }
        }
        if let Some((t, found)) = current.take() {
            finish(t, found, &mut page)?;
        }
        // The range is exhausted: no next page.
        page.next = None;
        Ok(page)
    }
}

#[async_trait]
impl TwinStore for ScyllaStore {
    /// Every write was acknowledged at the configured consistency: nothing to flush.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{fresh_keyspace, scylla_nodes};

    crate::conformance_suite!(|history| async move {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), history);
        let store = Arc::new(ScyllaStore::connect(&config).await.unwrap());
        let cleanup = dropped(store.clone(), config.keyspace);
        crate::conformance::Backend {
            store,
            keep: Box::new(()),
            cleanup: Some(Box::pin(cleanup)),
        }
    });

    /// Drops a test's keyspace once it passed: a test node with hundreds of tables gets
    /// slow to change its schema.
    async fn dropped(store: Arc<ScyllaStore>, keyspace: String) {
        store
            .session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_keyspace_of_a_newer_schema_is_refused_naming_both_versions() {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 10);
        let store = ScyllaStore::connect(&config).await.unwrap();
        store
            .session
            .query_unpaged(
                format!(
                    "UPDATE {}.schema_version SET version = ? WHERE id = 0",
                    config.keyspace
                ),
                (schema::VERSION + 1,),
            )
            .await
            .unwrap();
        let err = ScyllaStore::connect(&config)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("schema version {}", schema::VERSION + 1))
                && err.contains(&format!("({})", schema::VERSION)),
            "{err}"
        );
    }

    /// A keyspace of schema 1 (before `api_tokens`, with listings keyed by partitions of
    /// another hash) gets the table, its listings made anew, and the current version.
    #[tokio::test]
    async fn a_keyspace_of_an_older_schema_is_upgraded() {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 10);
        let store = ScyllaStore::connect(&config).await.unwrap();
        let ks = &config.keyspace;
        let thing = DeviceId::parse("t1").unwrap();
        let (record, _) = ThingRecord::new(thing.clone(), 1).unwrap();
        store.commit(vec![Write::Thing(record)]).await.unwrap();
        let (right, wrong) = (thing.partition(), (thing.partition() + 1) % 1024);
        for cql in [
            format!("DROP TABLE {ks}.api_tokens"),
            format!("UPDATE {ks}.schema_version SET version = 1 WHERE id = 0"),
            format!("DELETE FROM {ks}.members WHERE partition = {right}"),
            format!("INSERT INTO {ks}.members (partition, thing) VALUES ({wrong}, 't1')"),
        ] {
            store.session.query_unpaged(cql, ()).await.unwrap();
        }
        let store = ScyllaStore::connect(&config).await.unwrap();
        assert_eq!(store.members(right, None, 10).await.unwrap(), [thing]);
        assert!(store.members(wrong, None, 10).await.unwrap().is_empty());
        store.put_token("abc", "{}").await.unwrap();
        assert_eq!(store.tokens().await.unwrap(), [("abc".into(), "{}".into())]);
        let found = store
            .session
            .query_unpaged(
                format!("SELECT version FROM {ks}.schema_version WHERE id = 0"),
                (),
            )
            .await
            .unwrap();
        assert_eq!(rows::<(i32,)>(found, "v").unwrap(), [(schema::VERSION,)]);
        dropped(Arc::new(store), config.keyspace).await;
    }

    /// A deleted thing's command ids go with it: they are read before its rows go.
    #[tokio::test]
    async fn a_deleted_thing_leaves_no_command_listing_behind() {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 10);
        let store = Arc::new(ScyllaStore::connect(&config).await.unwrap());
        let t1 = DeviceId::parse("t1").unwrap();
        let (record, _) = ThingRecord::new(t1.clone(), 1).unwrap();
        store
            .commit(vec![
                Write::Thing(record),
                Write::Command(Arc::new(crate::conformance::command("t1", 1))),
                Write::Command(Arc::new(crate::conformance::command("t1", 2))),
            ])
            .await
            .unwrap();
        let listed = async |store: &ScyllaStore| {
            let found = store
                .session
                .query_unpaged(
                    format!("SELECT execution_id FROM {}.command_ids", config.keyspace),
                    (),
                )
                .await
                .unwrap();
            rows::<(String,)>(found, "command_ids").unwrap().len()
        };
        assert_eq!(listed(&store).await, 2);
        store.commit(vec![Write::DeleteThing(t1)]).await.unwrap();
        assert_eq!(listed(&store).await, 0, "command ids left behind");
        dropped(store, config.keyspace.clone()).await;
    }

    #[tokio::test]
    async fn a_twin_with_corrupt_rows_is_skipped_and_the_partition_still_listed() {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 10);
        let store = ScyllaStore::connect(&config).await.unwrap();
        let thing = DeviceId::parse("t1").unwrap();
        let partition = thing.partition();
        let mate = (0..)
            .map(|n| DeviceId::parse(&format!("m{n}")).unwrap())
            .find(|m| m.partition() == partition)
            .unwrap();
        let writes = [&thing, &mate]
            .iter()
            .map(|t| Write::Thing(ThingRecord::new((*t).clone(), 1).unwrap().0))
            .collect();
        store.commit(writes).await.unwrap();
        store
            .session
            .query_unpaged(
                format!(
                    "INSERT INTO {}.twin (thing, kind, key, value) VALUES (?, 'record', '', '{{not json')",
                    config.keyspace
                ),
                (mate.as_str(),),
            )
            .await
            .unwrap();
        let page = store.index_page(partition, None, 10).await.unwrap();
        let listed: Vec<&DeviceId> = page.twins.iter().map(|t| &t.record.id).collect();
        assert_eq!(listed, [&thing]);
        dropped(Arc::new(store), config.keyspace).await;
    }

    #[tokio::test]
    async fn history_rows_are_trimmed_every_few_versions() {
        trimmed(false).await;
    }

    /// A node holding every shard at one epoch.
    struct AllAt(u64);

    impl Fences for AllAt {
        fn epoch(&self, _: u16) -> Option<u64> {
            Some(self.0)
        }
    }

    /// Fenced, the trims go in the twin's conditional batch.
    #[tokio::test]
    async fn history_rows_are_trimmed_on_a_fenced_store_too() {
        trimmed(true).await;
    }

    async fn trimmed(fenced: bool) {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 3);
        let store = ScyllaStore::connect(&config).await.unwrap();
        if fenced {
            store.fence_with(Arc::new(AllAt(7))).unwrap();
            store.load(&DeviceId::parse("t1").unwrap()).await.unwrap();
        }
        let mut shadow = twin_model::Shadow::default();
        for n in 0..40 {
            let body = format!(r#"{{"state":{{"reported":{{"n":{n}}}}}}}"#);
            let w = crate::conformance::change(&mut shadow, &body, n);
            store.commit(vec![w]).await.unwrap();
        }
        let t1 = DeviceId::parse("t1").unwrap();
        let versions: Vec<u64> = store
            .history(&t1, &ShadowName::classic(), None, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.change.version)
            .collect();
        assert_eq!(versions, [40, 39, 38]);
        let found = store
            .session
            .query_unpaged(
                format!(
                    "SELECT key FROM {}.twin WHERE thing = 't1' AND kind = 'history'",
                    config.keyspace
                ),
                (),
            )
            .await
            .unwrap();
        let kept = rows::<(String,)>(found, "twin").unwrap().len() as u64;
        assert!(
            kept <= 3 + TRIM_EVERY,
            "{kept} history rows kept for a history of 3"
        );
        dropped(Arc::new(store), config.keyspace).await;
    }

    /// Retention by age is the history rows' TTL; nothing else of the twin expires.
    #[tokio::test]
    async fn history_rows_expire_after_the_retention() {
        let mut config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 3);
        config.history_retention = Some(Duration::from_secs(3600));
        let store = ScyllaStore::connect(&config).await.unwrap();
        let mut shadow = twin_model::Shadow::default();
        let w = crate::conformance::change(&mut shadow, r#"{"state":{"reported":{"n":1}}}"#, 1);
        store.commit(vec![w]).await.unwrap();
        let found = store
            .session
            .query_unpaged(
                format!(
                    "SELECT kind, TTL(value) FROM {}.twin WHERE thing = 't1'",
                    config.keyspace
                ),
                (),
            )
            .await
            .unwrap();
        let ttls: HashMap<String, Option<i32>> = rows::<(String, Option<i32>)>(found, "twin")
            .unwrap()
            .into_iter()
            .collect();
        let history = ttls["history"].expect("a history row has a TTL");
        assert!((3500..=3600).contains(&history), "TTL {history}");
        assert_eq!(ttls["shadow"], None, "a shadow never expires");
        dropped(Arc::new(store), config.keyspace).await;
    }

    /// Outbox positions go on after a reconnect, past the newest written even when
    /// `outbox_end` missed it (a failed batch), and reads cross buckets in order. Events
    /// and delivery records expire after `route_retention`.
    #[tokio::test]
    async fn outbox_positions_are_never_given_twice_and_read_across_buckets() {
        use crate::conformance::{delivery, event};
        let mut config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 3);
        config.route_retention = Duration::from_secs(3600);
        let ks = config.keyspace.clone();
        let store = ScyllaStore::connect(&config).await.unwrap();
        store
            .commit(vec![event("t1", 1, 10, &["r"])])
            .await
            .unwrap();
        let cql = async |store: &ScyllaStore, q: String| {
            store.session.query_unpaged(q, ()).await.unwrap()
        };
        // Just before the end of the first bucket.
        cql(
            &store,
            format!("INSERT INTO {ks}.outbox_end (id, position) VALUES (0, 65534)"),
        )
        .await;
        let store = ScyllaStore::connect(&config).await.unwrap();
        assert_eq!(store.outbox_end().await.unwrap(), 65_534);
        store
            .commit(vec![
                event("t1", 2, 11, &["r"]),
                event("t2", 1, 12, &["r"]),
                event("t1", 3, 13, &["r"]),
            ])
            .await
            .unwrap();
        let positions =
            async |store: &ScyllaStore, after: u64, limit: usize| -> Vec<(u64, String, u64)> {
                store
                    .outbox(after, limit)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(p, e)| (p, e.thing.to_string(), e.seq))
                    .collect()
            };
        let all = positions(&store, 0, 10).await;
        let want = [
            (1, "t1".to_owned(), 1),
            (65_535, "t1".to_owned(), 2),
            (65_536, "t2".to_owned(), 1),
            (65_537, "t1".to_owned(), 3),
        ];
        assert_eq!(all, want);
        assert_eq!(positions(&store, 0, 2).await, want[..2]);
        assert_eq!(positions(&store, 65_535, 10).await, want[2..]);
        assert_eq!(
            store
                .load(&crate::conformance::id("t1"))
                .await
                .unwrap()
                .event_seq,
            3
        );

        // An event written past `outbox_end` (its commit failed after the row landed).
        cql(
            &store,
            format!("INSERT INTO {ks}.outbox (bucket, position, event) VALUES (1, 65540, '{{}}') USING TTL 3600"),
        )
        .await;
        let store = ScyllaStore::connect(&config).await.unwrap();
        assert_eq!(store.outbox_end().await.unwrap(), 65_540);
        store
            .commit(vec![event("t2", 2, 14, &["r"])])
            .await
            .unwrap();
        assert_eq!(
            positions(&store, 65_540, 10).await,
            [(65_541, "t2".to_owned(), 2)]
        );

        // A batch the database refuses (over its 1 MiB batch size limit): its position
        // is given out, and held back from readers with every one after it, for now.
        let huge = match event("t2", 3, 15, &["r"]) {
            Write::Event(e) => Write::Event(Arc::new(OutboxRecord {
                data: serde_json::json!({"blob": "x".repeat(2 << 20)}),
                ..(*e).clone()
            })),
            _ => unreachable!(),
        };
        store.commit(vec![huge]).await.unwrap_err();
        store
            .commit(vec![event("t1", 4, 16, &["r"])])
            .await
            .unwrap();
        assert_eq!(store.outbox_end().await.unwrap(), 65_541);
        assert!(positions(&store, 65_541, 10).await.is_empty());
        let store = ScyllaStore::connect(&config).await.unwrap();
        assert_eq!(
            positions(&store, 65_541, 10).await,
            [(65_543, "t1".to_owned(), 4)]
        );

        store
            .put_deliveries(&[delivery("r", 1, crate::now_millis())])
            .await
            .unwrap();
        for table in ["outbox", "route_deliveries"] {
            let value = if table == "outbox" { "event" } else { "record" };
            let found = cql(&store, format!("SELECT TTL({value}) FROM {ks}.{table}")).await;
            let ttls = rows::<(Option<i32>,)>(found, table).unwrap();
            assert!(!ttls.is_empty());
            for (ttl,) in ttls {
                let ttl = ttl.unwrap_or_else(|| panic!("{table} rows expire"));
                assert!((3500..=3600).contains(&ttl), "{table} TTL {ttl}");
            }
        }
        dropped(Arc::new(store), ks).await;
    }

    /// A failed commit's positions are held back from readers for a while: its batch may
    /// still land, and must be read in its place.
    #[test]
    fn a_failed_commit_s_positions_are_held_back_until_they_settle() {
        let now = std::time::Instant::now();
        let mut visible = Visible {
            committed: 10,
            hold: Some((6, now + Duration::from_secs(60))),
        };
        assert_eq!(visible.end(), 6);
        visible.hold = Some((6, now - Duration::from_millis(1)));
        assert_eq!(visible.end(), 10);
        assert!(visible.hold.is_none());
    }

    /// A placement partition is a token range: a thing's token is the one the driver and
    /// the database compute, and falls in its partition's range.
    #[test]
    fn placement_partitions_are_token_ranges_of_the_driver_s_partitioner() {
        use scylla::routing::partitioner::{Partitioner, PartitionerName};
        for n in 0..2000u32 {
            let id = format!("dev-{n:x}-{}", "x".repeat((n % 37) as usize));
            let thing = DeviceId::parse(&id).unwrap();
            let token = PartitionerName::Murmur3.hash_one(id.as_bytes()).value();
            assert_eq!(thing.token(), token, "{id}");
            let (first, last) = twin_model::partition_tokens(thing.partition());
            assert!((first..=last).contains(&token), "{id}");
        }
        assert_eq!(twin_model::partition_tokens(0).0, i64::MIN);
        assert_eq!(
            twin_model::partition_tokens(twin_model::PARTITIONS - 1).1,
            i64::MAX
        );
    }

    #[tokio::test]
    async fn an_unreachable_database_is_named_with_its_cause() {
        let mut config = ScyllaConfig::single_node(vec!["127.0.0.1:1".into()], "doppel", 10);
        config.request_timeout = Duration::from_secs(2);
        let err = ScyllaStore::connect(&config)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot reach ScyllaDB at 127.0.0.1:1"),
            "{err}"
        );
    }
}
