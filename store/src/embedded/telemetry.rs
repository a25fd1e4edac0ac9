//! The embedded store's telemetry (layout in [`super`]): each thing's latest values, and
//! numeric readings in one keyspace per UTC day, so that retention drops whole days
//! instead of scanning for old readings.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch};
use twin_model::DeviceId;
use twin_model::telemetry::{Latest, Series, day};

use super::engine::{decode, encode, engine};
use crate::{Point, StoreError};

/// Day keyspaces are named this, then the day's number since the epoch.
const DAY_PREFIX: &str = "telemetry_day_";

pub(super) struct Telemetry {
    latest: Keyspace,
    days: RwLock<BTreeMap<u64, Keyspace>>,
    /// The first day retention keeps, once pruned: older readings (a device's late
    /// backlog) are not written, so that no pruned day comes back.
    floor: AtomicU64,
}

fn thing_prefix(thing: &DeviceId) -> Vec<u8> {
    let mut k = thing.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn point_key(thing: &DeviceId, key: &str, at: u64) -> Vec<u8> {
    let mut k = thing_prefix(thing);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(&at.to_be_bytes());
    k
}

impl Telemetry {
    pub(super) fn open(db: &Database) -> Result<Self, StoreError> {
        let latest = db
            .keyspace("telemetry_latest", KeyspaceCreateOptions::default)
            .map_err(engine)?;
        let mut days = BTreeMap::new();
        for name in db.list_keyspace_names() {
            let Some(n) = name
                .strip_prefix(DAY_PREFIX)
                .and_then(|d| d.parse::<u64>().ok())
            else {
                continue;
            };
            let ks = db
                .keyspace(&name, KeyspaceCreateOptions::default)
                .map_err(engine)?;
            days.insert(n, ks);
        }
        Ok(Self {
            latest,
            days: RwLock::new(days),
            floor: AtomicU64::new(0),
        })
    }

    fn day(&self, db: &Database, n: u64) -> Result<Keyspace, StoreError> {
        if let Some(ks) = self.days.read().unwrap_or_else(|p| p.into_inner()).get(&n) {
            return Ok(ks.clone());
        }
        let mut days = self.days.write().unwrap_or_else(|p| p.into_inner());
        if let Some(ks) = days.get(&n) {
            return Ok(ks.clone());
        }
        let ks = db
            .keyspace(&format!("{DAY_PREFIX}{n}"), KeyspaceCreateOptions::default)
            .map_err(engine)?;
        days.insert(n, ks.clone());
        Ok(ks)
    }

    fn existing_days(&self) -> Vec<(u64, Keyspace)> {
        self.days
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, ks)| (*n, ks.clone()))
            .collect()
    }

    pub(super) fn stage(
        &self,
        db: &Database,
        b: &mut WriteBatch,
        thing: &DeviceId,
        latest: &Latest,
        points: &[Point],
    ) -> Result<(), StoreError> {
        b.insert(&self.latest, thing.as_str(), encode(latest));
        let floor = self.floor.load(Ordering::Acquire);
        for p in points.iter().filter(|p| day(p.at) >= floor) {
            b.insert(
                &self.day(db, day(p.at))?,
                point_key(thing, &p.key, p.at),
                p.value.to_be_bytes(),
            );
        }
        Ok(())
    }

    /// Removes everything of the thing (its readings in every day kept).
    pub(super) fn stage_delete(
        &self,
        b: &mut WriteBatch,
        thing: &DeviceId,
    ) -> Result<(), StoreError> {
        b.remove(&self.latest, thing.as_str());
        let prefix = thing_prefix(thing);
        for (_, ks) in self.existing_days() {
            for kv in ks.prefix(&prefix) {
                b.remove(&ks, kv.key().map_err(engine)?);
            }
        }
        Ok(())
    }

    pub(super) fn latest(&self, thing: &DeviceId) -> Result<Latest, StoreError> {
        let key = thing.as_str().as_bytes();
        match self.latest.get(key).map_err(engine)? {
            Some(v) => decode(key, &v),
            None => Ok(Latest::default()),
        }
    }

    pub(super) fn series(
        &self,
        thing: &DeviceId,
        key: &str,
        mut series: Series,
    ) -> Result<Series, StoreError> {
        let (since, until) = series.range();
        let first = day(since);
        let last = day(until - 1);
        for (n, ks) in self.existing_days() {
            if n < first || n > last {
                continue;
            }
            for kv in ks.range(point_key(thing, key, since)..point_key(thing, key, until)) {
                let (k, v) = kv.into_inner().map_err(engine)?;
                let corrupt = || StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "not a telemetry point".into(),
                };
                let at = k
                    .len()
                    .checked_sub(8)
                    .and_then(|i| k[i..].try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(corrupt)?;
                let value = v
                    .as_ref()
                    .try_into()
                    .map(f64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                series.add(at, value);
            }
        }
        Ok(series)
    }

    /// Drops the days that ended before `before`; returns how many.
    pub(super) fn prune(&self, db: &Database, before: u64) -> Result<u64, StoreError> {
        let keep_from = day(before);
        self.floor.fetch_max(keep_from, Ordering::AcqRel);
        let old: Vec<(u64, Keyspace)> = {
            let mut days = self.days.write().unwrap_or_else(|p| p.into_inner());
            let kept = days.split_off(&keep_from);
            std::mem::replace(&mut *days, kept).into_iter().collect()
        };
        let dropped = old.len() as u64;
        for (_, ks) in old {
            db.delete_keyspace(ks).map_err(engine)?;
        }
        Ok(dropped)
    }
}
