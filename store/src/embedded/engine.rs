//! The blocking engine of the embedded store: fjall keyspaces, keys and codecs (the layout
//! is described in [`super`]).
//!
//! Over 600 lines with its unit tests: the code itself is 610 lines (every keyspace's reads and
//! writes, which must agree with each other); the layout tests follow it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write as _};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::de::DeserializeOwned;
use twin_model::certificate::CertificateId;
use twin_model::command::CommandExecution;
use twin_model::history::HistoryEntry;
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::{ChangeOp, DeviceId, ShadowName};

use super::outbox::Outbox;
use super::telemetry::Telemetry;
use crate::audit::AuditEntry;
use crate::{
    CaRecord, CertificateRecord, Deadline, IndexPage, JobCounts, StoreError, ThingRecord,
    TwinSnapshot, Write, indexed,
};

/// The on-disk layout this version writes. 2 added `members`, `deadlines` and `meta`; 3
/// keys them by placement partitions that follow the token ring (rebuilt on opening a 2).
pub const LAYOUT: u32 = 3;

/// The blocking engine: every method does disk IO on the calling thread.
pub struct Engine {
    pub(super) db: Database,
    things: Keyspace,
    presence: Keyspace,
    shadows: Keyspace,
    events: Keyspace,
    commands: Keyspace,
    command_ids: Keyspace,
    jobs: Keyspace,
    job_execs: Keyspace,
    job_targets: Keyspace,
    members: Keyspace,
    deadlines: Keyspace,
    certificates: Keyspace,
    ca_certificates: Keyspace,
    templates: Keyspace,
    audit: Keyspace,
    meta: Keyspace,
    pub(super) outbox: Outbox,
    pub(super) telemetry: Telemetry,
    history: u64,
    _lock: File,
}

pub(super) fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Takes the directory's lock or says who holds it.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    if file.try_lock().is_err() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(StoreError::Locked {
            dir: dir.display().to_string(),
            pid: pid.trim().parse().ok(),
        });
    }
    file.set_len(0).map_err(io(&path))?;
    file.rewind().map_err(io(&path))?;
    write!(file, "{}", std::process::id()).map_err(io(&path))?;
    Ok(file)
}

fn shadow_key(thing: &DeviceId, shadow: &ShadowName) -> Vec<u8> {
    let mut k = Vec::with_capacity(thing.as_str().len() + shadow.key().len() + 1);
    k.extend_from_slice(thing.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(shadow.key().as_bytes());
    k
}

fn event_key(thing: &DeviceId, shadow: &ShadowName, slot: u64) -> Vec<u8> {
    let mut k = shadow_key(thing, shadow);
    k.push(0);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

fn command_key(thing: &DeviceId, execution_id: &str) -> Vec<u8> {
    let mut k = thing.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(execution_id.as_bytes());
    k
}

fn job_target_key(job_id: &str, thing: &DeviceId) -> Vec<u8> {
    let mut k = job_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(thing.as_str().as_bytes());
    k
}

fn member_key(thing: &DeviceId) -> Vec<u8> {
    let mut k = thing.partition().to_be_bytes().to_vec();
    k.extend_from_slice(thing.as_str().as_bytes());
    k
}

/// The prefix of a thing's pending deadlines.
fn deadline_prefix(thing: &DeviceId) -> Vec<u8> {
    let mut k = member_key(thing);
    k.push(0);
    k
}

/// `kind` is `c` (a command execution) or `j` (a job execution).
fn deadline_key(thing: &DeviceId, kind: u8, id: &str) -> Vec<u8> {
    let mut k = deadline_prefix(thing);
    k.push(kind);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The keys of `partition` after `after` (a key inside it), or all of them.
fn partition_range(partition: u16, after: Option<Vec<u8>>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = match after {
        Some(k) => Bound::Excluded(k),
        None => Bound::Included(partition.to_be_bytes().to_vec()),
    };
    let end = match partition.checked_add(1) {
        Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
        None => Bound::Unbounded,
    };
    (start, end)
}

fn parse_thing(k: &[u8], bytes: &[u8]) -> Result<DeviceId, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| DeviceId::parse(t).ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(k).replace('\0', "/"),
            reason: "bad thing name".into(),
        })
}

pub(super) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(key, &e))
}

fn corrupt(key: &[u8], reason: &serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: reason.to_string(),
    }
}

/// Up to `limit` values of `keyspace` in key order, after the key `after`.
pub(super) fn page<T: DeserializeOwned>(
    keyspace: &Keyspace,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<T>, StoreError> {
    let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_vec()));
    let mut out = Vec::new();
    for kv in keyspace
        .range::<Vec<u8>, _>((start, Bound::Unbounded))
        .take(limit)
    {
        let (k, v) = kv.into_inner().map_err(engine)?;
        out.push(decode(&k, &v)?);
    }
    Ok(out)
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Sized for a typical record: growing from empty showed up in profiles.
    let mut buf = Vec::with_capacity(512);
    // Our records are plain data: serializing them cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf
}

impl Engine {
    /// Opens (creating if needed) the store in `dir`, keeping the newest `history`
    /// changes of each shadow.
    pub fn open(dir: impl Into<PathBuf>, history: u64) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock = lock(&dir)?;
        let db = Database::builder(dir.join("fjall"))
            .open()
            .map_err(engine)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine)
        };
        Self {
            things: ks("things")?,
            presence: ks("presence")?,
            shadows: ks("shadows")?,
            events: ks("events")?,
            commands: ks("commands")?,
            command_ids: ks("command_ids")?,
            jobs: ks("jobs")?,
            job_execs: ks("job_execs")?,
            job_targets: ks("job_targets")?,
            members: ks("members")?,
            deadlines: ks("deadlines")?,
            certificates: ks("certificates")?,
            ca_certificates: ks("ca_certificates")?,
            templates: ks("templates")?,
            audit: ks("audit")?,
            meta: ks("meta")?,
            outbox: Outbox::open(&db)?,
            telemetry: Telemetry::open(&db)?,
            db,
            history: history.max(1),
            _lock: lock,
        }
        .upgraded()
    }

    /// Brings a directory written with an older layout up to [`LAYOUT`], in one durable
    /// batch; refuses one written by a newer version.
    fn upgraded(self) -> Result<Self, StoreError> {
        let layout = match self.meta.get("layout").map_err(engine)? {
            Some(v) => decode::<u32>(b"layout", &v)?,
            None => 1,
        };
        if layout > LAYOUT {
            return Err(StoreError::Corrupt {
                key: "layout".into(),
                reason: format!(
                    "written by a newer doppel (layout {layout}; this one reads up to {LAYOUT})"
                ),
            });
        }
        if layout == LAYOUT {
            return Ok(self);
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        // Listings of layout 2 are keyed by partitions of another hash: made anew.
        for listing in [&self.members, &self.deadlines] {
            for kv in listing.iter() {
                b.remove(listing, kv.key().map_err(engine)?);
            }
        }
        for kv in self.things.iter() {
            let k = kv.key().map_err(engine)?;
            b.insert(&self.members, member_key(&parse_thing(&k, &k)?), []);
        }
        for kv in self.commands.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let c: CommandExecution = decode(&k, &v)?;
            if let Some(at) = c.deadline() {
                b.insert(
                    &self.deadlines,
                    deadline_key(&c.thing, b'c', &c.execution_id),
                    at.to_be_bytes(),
                );
            }
        }
        for kv in self.job_execs.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let e: JobExecution = decode(&k, &v)?;
            if let Some(at) = e.deadline() {
                b.insert(
                    &self.deadlines,
                    deadline_key(&e.thing, b'j', &e.job_id),
                    at.to_be_bytes(),
                );
            }
        }
        b.insert(&self.meta, "layout", encode(&LAYOUT));
        b.commit().map_err(engine)?;
        tracing::info!(
            from = layout,
            to = LAYOUT,
            "upgraded the data directory's layout"
        );
        Ok(self)
    }

    pub fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        let mut snap = self.load_view(thing)?;
        snap.event_seq = self.outbox.seq(thing)?;
        let mut prefix = thing.as_str().as_bytes().to_vec();
        prefix.push(0);
        for kv in self.commands.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let c: CommandExecution = decode(&k, &v)?;
            if !c.status.is_terminal() {
                snap.pending_commands.push(c);
            }
        }
        for kv in self.job_execs.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            snap.job_executions.push(decode(&k, &v)?);
        }
        Ok(snap)
    }

    /// A twin's record, presence and shadows: what the fleet index needs, without its
    /// commands and job executions.
    fn load_view(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        let key = thing.as_str().as_bytes();
        let record = match self.things.get(key).map_err(engine)? {
            Some(v) => Some(decode(key, &v)?),
            None => None,
        };
        let connectivity = match self.presence.get(key).map_err(engine)? {
            Some(v) => decode(key, &v)?,
            None => Default::default(),
        };
        let mut prefix = key.to_vec();
        prefix.push(0);
        let mut shadows = Vec::new();
        for kv in self.shadows.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let name = std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|s| ShadowName::from_key(s).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "bad shadow name".into(),
                })?;
            shadows.push((name, decode(&k, &v)?));
        }
        Ok(TwinSnapshot {
            record,
            connectivity,
            shadows,
            telemetry: self.telemetry.latest(thing)?,
            ..TwinSnapshot::default()
        })
    }

    /// Writes a batch atomically (the whole batch: stronger than [`TwinStateStore`](crate::TwinStateStore) asks)
    /// and durably.
    pub fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        let appends = batch.iter().any(|w| matches!(w, Write::Event(_)));
        let mut last = appends.then(|| self.outbox.appending());
        let mut next = last.as_deref().copied().unwrap_or_default();
        for w in batch {
            match w {
                Write::Event(event) => self.outbox.stage(&mut b, &mut next, event),
                Write::Telemetry {
                    thing,
                    latest,
                    points,
                } => self
                    .telemetry
                    .stage(&self.db, &mut b, thing, latest, points)?,
                Write::Shadow {
                    thing,
                    shadow,
                    state,
                    change,
                } => {
                    // The state is serialized once, for its row and inside its entry.
                    let encoded = encode(&**state);
                    let delete = u64::from(matches!(change.op, ChangeOp::Delete));
                    let slot = (2 * change.version + delete) % (2 * self.history);
                    b.insert(
                        &self.events,
                        event_key(thing, shadow, slot),
                        HistoryEntry::encode_with(change, &encoded),
                    );
                    b.insert(&self.shadows, shadow_key(thing, shadow), encoded);
                }
                Write::Connectivity {
                    thing,
                    connectivity,
                } => {
                    b.insert(&self.presence, thing.as_str(), encode(connectivity));
                }
                Write::Thing(record) => {
                    b.insert(&self.things, record.id.as_str(), encode(record));
                    b.insert(&self.members, member_key(&record.id), []);
                }
                Write::Command(c) => {
                    b.insert(
                        &self.commands,
                        command_key(&c.thing, &c.execution_id),
                        encode(&**c),
                    );
                    b.insert(&self.command_ids, c.execution_id.as_str(), c.thing.as_str());
                    let key = deadline_key(&c.thing, b'c', &c.execution_id);
                    match c.deadline() {
                        Some(at) => b.insert(&self.deadlines, key, at.to_be_bytes()),
                        None => b.remove(&self.deadlines, key),
                    }
                }
                Write::Job(job) => {
                    b.insert(&self.jobs, job.job_id.as_str(), encode(&**job));
                }
                Write::JobExecution(e) => {
                    b.insert(
                        &self.job_execs,
                        command_key(&e.thing, &e.job_id),
                        encode(&**e),
                    );
                    b.insert(
                        &self.job_targets,
                        job_target_key(&e.job_id, &e.thing),
                        encode(&e.status),
                    );
                    let key = deadline_key(&e.thing, b'j', &e.job_id);
                    match e.deadline() {
                        Some(at) => b.insert(&self.deadlines, key, at.to_be_bytes()),
                        None => b.remove(&self.deadlines, key),
                    }
                }
                Write::DeleteThing(thing) => {
                    b.remove(&self.things, thing.as_str());
                    b.remove(&self.presence, thing.as_str());
                    b.remove(&self.members, member_key(thing));
                    self.telemetry.stage_delete(&mut b, thing)?;
                    for kv in self.deadlines.prefix(deadline_prefix(thing)) {
                        b.remove(&self.deadlines, kv.key().map_err(engine)?);
                    }
                    let mut prefix = thing.as_str().as_bytes().to_vec();
                    prefix.push(0);
                    for kv in self.commands.prefix(&prefix) {
                        let key = kv.key().map_err(engine)?;
                        b.remove(&self.command_ids, &key[prefix.len()..]);
                    }
                    // `job_targets` keeps the thing's final status in each job it was in.
                    for ks in [&self.shadows, &self.events, &self.commands, &self.job_execs] {
                        for kv in ks.prefix(&prefix) {
                            b.remove(ks, kv.key().map_err(engine)?);
                        }
                    }
                }
            }
        }
        b.commit().map_err(engine)?;
        if let Some(last) = last.as_deref_mut() {
            *last = next;
        }
        Ok(())
    }

    pub fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut prefix = shadow_key(thing, shadow);
        prefix.push(0);
        let mut out: Vec<HistoryEntry> = Vec::new();
        for kv in self.events.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(HistoryEntry::decode(&v).map_err(|e| corrupt(&k, &e))?);
        }
        // Ring slots are not in time order, and deletes make the ring hold more than the
        // `history` changes retained.
        out.sort_by_key(|e| std::cmp::Reverse(e.position()));
        out.truncate(self.history as usize);
        out.retain(|e| before.is_none_or(|b| e.position() < b));
        out.truncate(limit);
        Ok(out)
    }

    pub fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        let key = thing.as_str().as_bytes();
        match self.things.get(key).map_err(engine)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Writes a certificate's record, durably.
    pub fn put_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.certificates, record.id.as_str(), encode(record));
        b.commit().map_err(engine)
    }

    pub fn certificate(&self, id: &CertificateId) -> Result<Option<CertificateRecord>, StoreError> {
        let key = id.as_str().as_bytes();
        match self.certificates.get(key).map_err(engine)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Certificates in id order, after `after`.
    pub fn certificates(
        &self,
        after: Option<&CertificateId>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        page(
            &self.certificates,
            after.map(|a| a.as_str().as_bytes()),
            limit,
        )
    }

    /// Writes a CA's record, durably.
    pub fn put_ca_certificate(&self, record: &CaRecord) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.ca_certificates, record.id.as_str(), encode(record));
        b.commit().map_err(engine)
    }

    pub fn ca_certificates(&self) -> Result<Vec<CaRecord>, StoreError> {
        page(&self.ca_certificates, None, usize::MAX)
    }

    /// Writes a provisioning template, durably.
    pub fn put_template(&self, template: &ProvisioningTemplate) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.templates, template.name.as_str(), encode(template));
        b.commit().map_err(engine)
    }

    pub fn templates(&self) -> Result<Vec<ProvisioningTemplate>, StoreError> {
        page(&self.templates, None, usize::MAX)
    }

    /// Appends an audit entry unless its `seq` is taken (`false`), durably. The directory
    /// lock makes this process the only writer, and the log's writer appends one at a time.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError> {
        if self
            .audit
            .contains_key(entry.seq.to_be_bytes())
            .map_err(engine)?
        {
            return Ok(false);
        }
        self.put_audit(entry)?;
        Ok(true)
    }

    /// Writes an audit entry, durably.
    pub fn put_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&self.audit, entry.seq.to_be_bytes(), encode(entry));
        b.commit().map_err(engine)
    }

    /// Audit entries in sequence order, after `after`.
    pub fn audit_entries(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let after = after.map(u64::to_be_bytes);
        page(&self.audit, after.as_ref().map(|a| &a[..]), limit)
    }

    pub fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        match self.audit.last_key_value() {
            Some(kv) => {
                let (k, v) = kv.into_inner().map_err(engine)?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    pub fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError> {
        match self.jobs.get(job_id).map_err(engine)? {
            Some(v) => Ok(Some(decode(job_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn jobs(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, StoreError> {
        page(&self.jobs, after.map(str::as_bytes), limit)
    }

    pub fn job_statuses(
        &self,
        job_id: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        let mut prefix = job_id.as_bytes().to_vec();
        prefix.push(0);
        let start = match after {
            Some(a) => Bound::Excluded(job_target_key(job_id, a)),
            None => Bound::Included(prefix.clone()),
        };
        // One past the prefix: `\0` + 1.
        let mut end = job_id.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for kv in self
            .job_targets
            .range::<Vec<u8>, _>((start, Bound::Excluded(end)))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push((parse_thing(&k, &k[prefix.len()..])?, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Counts the job's `job_targets` entries: a read of one status per target.
    pub fn job_counts(&self, job_id: &str) -> Result<JobCounts, StoreError> {
        let mut prefix = job_id.as_bytes().to_vec();
        prefix.push(0);
        let mut counts = JobCounts::default();
        for kv in self.job_targets.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            counts.add(decode(&k, &v)?);
        }
        Ok(counts)
    }

    pub fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError> {
        let Some(thing) = self.command_ids.get(execution_id).map_err(engine)? else {
            return Ok(None);
        };
        let thing = parse_thing(execution_id.as_bytes(), &thing)?;
        let key = command_key(&thing, execution_id);
        match self.commands.get(&key).map_err(engine)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    pub fn commands(
        &self,
        thing: &DeviceId,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        let start = command_key(thing, "");
        let end = match before {
            Some(id) => Bound::Excluded(command_key(thing, id)),
            // One past the prefix: `\0` + 1.
            None => {
                let mut k = thing.as_str().as_bytes().to_vec();
                k.push(1);
                Bound::Excluded(k)
            }
        };
        let mut out = Vec::new();
        for kv in self
            .commands
            .range::<Vec<u8>, _>((Bound::Included(start), end))
            .rev()
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub fn things(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<ThingRecord>, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a.as_str().as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self
            .things
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub fn index_page(
        &self,
        partition: u16,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<IndexPage, StoreError> {
        let range = partition_range(partition, after.map(member_key));
        let mut page = IndexPage::default();
        for kv in self.members.range::<Vec<u8>, _>(range).take(limit) {
            let k = kv.key().map_err(engine)?;
            let thing = parse_thing(&k, &k[2..])?;
            page.next = Some(thing.clone());
            if let Some(twin) = indexed(&thing, self.load_view(&thing))? {
                page.twins.push(twin);
            }
        }
        Ok(page)
    }

    pub fn pending_deadlines(
        &self,
        partition: u16,
        after: Option<(&DeviceId, &str)>,
        limit: usize,
    ) -> Result<Vec<Deadline>, StoreError> {
        // Items sort after their kind byte; the cursor names the item with its kind.
        let after = after.map(|(thing, item)| {
            let mut k = deadline_prefix(thing);
            k.extend_from_slice(item.as_bytes());
            k
        });
        let mut out = Vec::new();
        for kv in self
            .deadlines
            .range::<Vec<u8>, _>(partition_range(partition, after))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let corrupt = || StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).replace('\0', "/"),
                reason: "bad deadline entry".into(),
            };
            let rest = k.get(2..).ok_or_else(corrupt)?;
            let split = rest.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
            let item = std::str::from_utf8(&rest[split + 1..]).map_err(|_| corrupt())?;
            let at: [u8; 8] = v.as_ref().try_into().map_err(|_| corrupt())?;
            out.push(Deadline {
                thing: parse_thing(&k, &rest[..split])?,
                item: item.to_owned(),
                at: u64::from_be_bytes(at),
            });
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{change, id};
    use twin_model::{Connectivity, Shadow};

    #[test]
    fn what_was_committed_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut shadow = Shadow::default();
        {
            let store = Engine::open(dir.path(), 3).unwrap();
            let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
            store
                .commit(&[
                    Write::Thing(record),
                    change(&mut shadow, r#"{"state":{"reported":{"n":1}}}"#, 10),
                    Write::Connectivity {
                        thing: id("t1"),
                        connectivity: Connectivity {
                            connected: true,
                            since: 5,
                            disconnect_reason: None,
                        },
                    },
                ])
                .unwrap();
        }
        let store = Engine::open(dir.path(), 3).unwrap();
        let snap = store.load(&id("t1")).unwrap();
        assert_eq!(snap.shadows, vec![(ShadowName::classic(), shadow)]);
        assert!(snap.connectivity.connected);
        assert_eq!(
            store
                .history(&id("t1"), &ShadowName::classic(), None, 10)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_second_opener_is_told_who_holds_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Engine::open(dir.path(), 10).unwrap();
        let err = Engine::open(dir.path(), 10).err().unwrap();
        assert!(
            matches!(err, StoreError::Locked { pid: Some(p), .. } if p == std::process::id()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("in use by a running doppel server")
        );
    }

    #[test]
    fn a_directory_of_the_first_layout_gets_its_listings_built() {
        let dir = tempfile::tempdir().unwrap();
        let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
        let command = crate::conformance::command("t1", 1);
        {
            let store = Engine::open(dir.path(), 3).unwrap();
            store
                .commit(&[
                    Write::Thing(record.clone()),
                    Write::Command(std::sync::Arc::new(command.clone())),
                ])
                .unwrap();
            // What a first-layout directory looks like: no listings, no layout mark.
            for ks in [&store.members, &store.deadlines, &store.meta] {
                for kv in ks.iter() {
                    ks.remove(kv.key().unwrap()).unwrap();
                }
            }
            assert!(
                store
                    .index_page(id("t1").partition(), None, 10)
                    .unwrap()
                    .twins
                    .is_empty()
            );
        }
        let store = Engine::open(dir.path(), 3).unwrap();
        let page = store.index_page(id("t1").partition(), None, 10).unwrap();
        assert_eq!(page.twins.len(), 1);
        assert_eq!(page.twins[0].record, record);
        let deadlines = store
            .pending_deadlines(id("t1").partition(), None, 10)
            .unwrap();
        assert_eq!(
            deadlines.iter().map(|d| d.at).collect::<Vec<_>>(),
            vec![command.deadline().unwrap()]
        );
    }

    /// Layout 2 keyed its listings by partitions of another hash: opened, they are made
    /// anew under the token-ring partitions, and the old entries are gone.
    #[test]
    fn a_directory_of_layout_2_gets_its_listings_rekeyed() {
        let dir = tempfile::tempdir().unwrap();
        let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
        let (right, wrong) = (id("t1").partition(), (id("t1").partition() + 1) % 1024);
        {
            let store = Engine::open(dir.path(), 3).unwrap();
            store.commit(&[Write::Thing(record.clone())]).unwrap();
            for kv in store.members.iter() {
                store.members.remove(kv.key().unwrap()).unwrap();
            }
            let mut stale = wrong.to_be_bytes().to_vec();
            stale.extend_from_slice(b"t1");
            store.members.insert(stale, []).unwrap();
            store.meta.insert("layout", encode(&2u32)).unwrap();
        }
        let store = Engine::open(dir.path(), 3).unwrap();
        assert_eq!(store.index_page(right, None, 10).unwrap().twins.len(), 1);
        assert!(store.index_page(wrong, None, 10).unwrap().twins.is_empty());
    }

    #[test]
    fn a_directory_of_a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Engine::open(dir.path(), 3).unwrap();
            store.meta.insert("layout", encode(&(LAYOUT + 1))).unwrap();
        }
        let err = Engine::open(dir.path(), 3).err().unwrap();
        assert!(
            err.to_string().contains("written by a newer doppel"),
            "{err}"
        );
    }

    #[test]
    fn a_twin_with_corrupt_rows_is_skipped_and_the_partition_still_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Engine::open(dir.path(), 3).unwrap();
        let partition = id("t1").partition();
        let mates: Vec<DeviceId> = (0..)
            .map(|n| id(&format!("m{n}")))
            .filter(|m| m.partition() == partition)
            .take(2)
            .collect();
        let mut writes = vec![Write::Thing(ThingRecord::new(id("t1"), 1).unwrap().0)];
        for m in &mates {
            writes.push(Write::Thing(ThingRecord::new(m.clone(), 1).unwrap().0));
        }
        store.commit(&writes).unwrap();
        store
            .things
            .insert(mates[0].as_str(), b"{not json")
            .unwrap();
        // One thing a page: the corrupt one's page lists no twin but goes on.
        let (mut listed, mut after) = (Vec::new(), None);
        loop {
            let page = store.index_page(partition, after.as_ref(), 1).unwrap();
            listed.extend(page.twins.into_iter().map(|t| t.record.id));
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        let mut expected = vec![id("t1"), mates[1].clone()];
        expected.sort();
        assert_eq!(listed, expected);
    }
}
