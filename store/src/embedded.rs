//! The embedded backend: fjall (an LSM tree) on local disk.
//!
//! Measured on this workload (a shadow document and an event per update, ~600 bytes
//! each, durable batches): fjall 69k updates/s at 100 per commit and 91k at 1000, redb
//! 47k and 69k, with about the same disk use. See the README's storage section.
//!
//! Layout, one keyspace each (thing ids and shadow names never contain `\0`):
//! - `things`:   `{thing}` -> [`ThingRecord`] (JSON)
//! - `presence`: `{thing}` -> [`Connectivity`] (JSON)
//! - `shadows`:  `{thing}\0{shadow}` -> [`Shadow`] (JSON)
//! - `commands`: `{thing}\0{executionId}` -> [`CommandExecution`] (JSON); execution ids
//!   sort in creation order.
//! - `command_ids`: `{executionId}` -> `{thing}`, to find an execution by its id alone.
//! - `jobs`: `{jobId}` -> [`JobDefinition`] (JSON)
//! - `job_execs`: `{thing}\0{jobId}` -> [`JobExecution`] (JSON)
//! - `job_targets`: `{jobId}\0{thing}` -> the execution's status (JSON), to count a job's
//!   executions without reading them; kept when the thing is deleted.
//! - `events`:   `{thing}\0{shadow}\0{slot:be64}` -> [`ShadowChange`] (JSON): a ring of
//!   the newest changes per shadow, slot = (2 * version + is_delete) mod (2 * history).
//!   Each change overwrites the slot of the change `history` versions older, so the
//!   history stays bounded without tombstones (two writes per update, not four); a
//!   delete, which keeps its shadow's version, has a slot of its own.
//!
//! A `LOCK` file held with an OS lock keeps a second process off the directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write as _};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::de::DeserializeOwned;
use twin_model::command::CommandExecution;
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
use twin_model::{ChangeOp, DeviceId, ShadowChange, ShadowName};

use crate::{Scanned, StoreError, ThingRecord, TwinSnapshot, TwinStore, Write};

pub struct EmbeddedStore {
    db: Database,
    things: Keyspace,
    presence: Keyspace,
    shadows: Keyspace,
    events: Keyspace,
    commands: Keyspace,
    command_ids: Keyspace,
    jobs: Keyspace,
    job_execs: Keyspace,
    job_targets: Keyspace,
    history: u64,
    _lock: File,
}

fn engine(e: impl std::fmt::Display) -> StoreError {
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

/// The thing and shadow of a `shadows` key.
fn split_shadow_key(k: &[u8]) -> Result<(DeviceId, ShadowName), StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason: "bad shadow key".into(),
    };
    let text = std::str::from_utf8(k).map_err(|_| corrupt())?;
    let (thing, shadow) = text.split_once('\0').ok_or_else(corrupt)?;
    Ok((
        DeviceId::parse(thing).map_err(|_| corrupt())?,
        ShadowName::from_key(shadow).map_err(|_| corrupt())?,
    ))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Sized for a typical record: growing from empty showed up in profiles.
    let mut buf = Vec::with_capacity(512);
    // Our records are plain data: serializing them cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf
}

impl EmbeddedStore {
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
        Ok(Self {
            things: ks("things")?,
            presence: ks("presence")?,
            shadows: ks("shadows")?,
            events: ks("events")?,
            commands: ks("commands")?,
            command_ids: ks("command_ids")?,
            jobs: ks("jobs")?,
            job_execs: ks("job_execs")?,
            job_targets: ks("job_targets")?,
            db,
            history: history.max(1),
            _lock: lock,
        })
    }
}

impl TwinStore for EmbeddedStore {
    fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
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
        let mut pending_commands = Vec::new();
        for kv in self.commands.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let c: CommandExecution = decode(&k, &v)?;
            if !c.status.is_terminal() {
                pending_commands.push(c);
            }
        }
        let mut job_executions = Vec::new();
        for kv in self.job_execs.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            job_executions.push(decode(&k, &v)?);
        }
        Ok(TwinSnapshot {
            record,
            connectivity,
            shadows,
            pending_commands,
            job_executions,
        })
    }

    fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        for w in batch {
            match w {
                Write::Shadow {
                    thing,
                    shadow,
                    state,
                    change,
                } => {
                    b.insert(&self.shadows, shadow_key(thing, shadow), encode(&**state));
                    let delete = u64::from(matches!(change.op, ChangeOp::Delete));
                    let slot = (2 * change.version + delete) % (2 * self.history);
                    b.insert(
                        &self.events,
                        event_key(thing, shadow, slot),
                        encode(&**change),
                    );
                }
                Write::Connectivity {
                    thing,
                    connectivity,
                } => {
                    b.insert(&self.presence, thing.as_str(), encode(connectivity));
                }
                Write::Thing(record) => {
                    b.insert(&self.things, record.id.as_str(), encode(record));
                }
                Write::Command(c) => {
                    b.insert(
                        &self.commands,
                        command_key(&c.thing, &c.execution_id),
                        encode(&**c),
                    );
                    b.insert(&self.command_ids, c.execution_id.as_str(), c.thing.as_str());
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
                }
                Write::DeleteThing(thing) => {
                    b.remove(&self.things, thing.as_str());
                    b.remove(&self.presence, thing.as_str());
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
        b.commit().map_err(engine)
    }

    fn history(
        &self,
        thing: &DeviceId,
        shadow: &ShadowName,
        limit: usize,
    ) -> Result<Vec<ShadowChange>, StoreError> {
        let mut prefix = shadow_key(thing, shadow);
        prefix.push(0);
        let mut out: Vec<ShadowChange> = Vec::new();
        for kv in self.events.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(decode(&k, &v)?);
        }
        // Ring slots are not in time order. A delete follows the update of its version.
        out.sort_by_key(|c| (c.version, matches!(c.op, ChangeOp::Delete)));
        let keep = out.len().min(limit).min(self.history as usize);
        Ok(out.split_off(out.len() - keep))
    }

    fn thing(&self, thing: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        let key = thing.as_str().as_bytes();
        match self.things.get(key).map_err(engine)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, StoreError> {
        match self.jobs.get(job_id).map_err(engine)? {
            Some(v) => Ok(Some(decode(job_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    fn jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<JobDefinition>, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self
            .jobs
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn job_statuses(&self, job_id: &str) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        let mut prefix = job_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.job_targets.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let thing = std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|t| DeviceId::parse(t).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).replace('\0', "/"),
                    reason: "bad thing name".into(),
                })?;
            out.push((thing, decode(&k, &v)?));
        }
        Ok(out)
    }

    fn command(&self, execution_id: &str) -> Result<Option<CommandExecution>, StoreError> {
        let Some(thing) = self.command_ids.get(execution_id).map_err(engine)? else {
            return Ok(None);
        };
        let thing = std::str::from_utf8(&thing)
            .ok()
            .and_then(|t| DeviceId::parse(t).ok())
            .ok_or_else(|| StoreError::Corrupt {
                key: execution_id.to_owned(),
                reason: "bad thing name".into(),
            })?;
        let key = command_key(&thing, execution_id);
        match self.commands.get(&key).map_err(engine)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    fn commands(
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

    fn things(
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

    fn scan(&self, visit: &mut dyn FnMut(Scanned)) -> Result<(), StoreError> {
        for kv in self.things.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            visit(Scanned::Thing(decode(&k, &v)?));
        }
        for kv in self.presence.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let thing = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| DeviceId::parse(s).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "bad thing name".into(),
                })?;
            visit(Scanned::Presence(thing, decode(&k, &v)?));
        }
        for kv in self.shadows.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let (thing, shadow) = split_shadow_key(&k)?;
            visit(Scanned::Shadow(thing, shadow, Box::new(decode(&k, &v)?)));
        }
        for kv in self.commands.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let c: CommandExecution = decode(&k, &v)?;
            if let Some(at) = c.deadline() {
                visit(Scanned::Deadline(c.thing, at));
            }
        }
        for kv in self.job_execs.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let e: JobExecution = decode(&k, &v)?;
            if let Some(at) = e.deadline() {
                visit(Scanned::Deadline(e.thing, at));
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{change, id};
    use twin_model::{Connectivity, Shadow};

    crate::conformance_suite!(|history| {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), history).unwrap();
        crate::conformance::Backend {
            store: Box::new(store),
            keep: Box::new(dir),
        }
    });

    #[test]
    fn what_was_committed_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut shadow = Shadow::default();
        {
            let store = EmbeddedStore::open(dir.path(), 3).unwrap();
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
        let store = EmbeddedStore::open(dir.path(), 3).unwrap();
        let snap = store.load(&id("t1")).unwrap();
        assert_eq!(snap.shadows, vec![(ShadowName::classic(), shadow)]);
        assert!(snap.connectivity.connected);
        assert_eq!(
            store
                .history(&id("t1"), &ShadowName::classic(), 10)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_second_opener_is_told_who_holds_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path(), 10).unwrap();
        let err = EmbeddedStore::open(dir.path(), 10).err().unwrap();
        assert!(
            matches!(err, StoreError::Locked { pid: Some(p), .. } if p == std::process::id()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("in use by a running doppel server")
        );
    }
}
