//! The embedded store's routes, outbox, cursors and delivery logs (layout in [`super`]).

use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use fjall::{
    Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch, PersistMode,
};
use twin_model::DeviceId;

use super::engine::{decode, encode, engine, page};
use crate::StoreError;
use crate::routes::{DeliveryKey, DeliveryRecord, OutboxRecord, RouteRecord};

pub(super) struct Outbox {
    events: Keyspace,
    seqs: Keyspace,
    routes: Keyspace,
    cursors: Keyspace,
    deliveries: Keyspace,
    /// The newest position given out. Held while a batch with events is committed, so
    /// that positions become visible in order: a reader that sees one sees all before it.
    last: Mutex<u64>,
}

fn delivery_prefix(route: &str) -> Vec<u8> {
    let mut k = route.as_bytes().to_vec();
    k.push(0);
    k
}

impl Outbox {
    pub(super) fn open(db: &Database) -> Result<Self, StoreError> {
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine)
        };
        let events = ks("outbox")?;
        let last = match events.last_key_value() {
            Some(kv) => position(&kv.key().map_err(engine)?)?,
            None => 0,
        };
        Ok(Self {
            events,
            seqs: ks("event_seqs")?,
            routes: ks("routes")?,
            cursors: ks("route_cursors")?,
            deliveries: ks("deliveries")?,
            last: Mutex::new(last),
        })
    }

    /// Held while a batch with events is staged and committed.
    pub(super) fn appending(&self) -> MutexGuard<'_, u64> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an event to `b` at the next position after `last`.
    pub(super) fn stage(&self, b: &mut WriteBatch, last: &mut u64, event: &OutboxRecord) {
        *last += 1;
        b.insert(&self.events, last.to_be_bytes(), encode(event));
        b.insert(&self.seqs, event.thing.as_str(), event.seq.to_be_bytes());
    }

    /// The thing's newest event number.
    pub(super) fn seq(&self, thing: &DeviceId) -> Result<u64, StoreError> {
        Ok(match self.seqs.get(thing.as_str()).map_err(engine)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: format!("event_seqs/{thing}"),
                    reason: "not 8 bytes".into(),
                })?)
            }
            None => 0,
        })
    }

    fn durable(db: &Database) -> WriteBatch {
        db.batch().durability(Some(PersistMode::SyncAll))
    }

    pub(super) fn put_route(&self, db: &Database, route: &RouteRecord) -> Result<(), StoreError> {
        let mut b = Self::durable(db);
        b.insert(&self.routes, route.id.as_str(), encode(route));
        b.commit().map_err(engine)
    }

    pub(super) fn delete_route(&self, db: &Database, id: &str) -> Result<(), StoreError> {
        let mut b = Self::durable(db);
        b.remove(&self.routes, id);
        b.remove(&self.cursors, id);
        for kv in self.deliveries.prefix(delivery_prefix(id)) {
            b.remove(&self.deliveries, kv.key().map_err(engine)?);
        }
        b.commit().map_err(engine)
    }

    pub(super) fn routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        page(&self.routes, None, usize::MAX)
    }

    pub(super) fn outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let mut out = Vec::new();
        let start = Bound::Excluded(after.to_be_bytes().to_vec());
        for kv in self
            .events
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push((position(&k)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    pub(super) fn outbox_end(&self) -> u64 {
        *self.appending()
    }

    /// Not synced: a cursor lost with the machine only sends events again, with their
    /// ids (at least once).
    pub(super) fn put_cursor(&self, db: &Database, route: &str, at: u64) -> Result<(), StoreError> {
        let mut b = db.batch();
        b.insert(&self.cursors, route, at.to_be_bytes());
        b.commit().map_err(engine)
    }

    pub(super) fn cursor(&self, route: &str) -> Result<Option<u64>, StoreError> {
        match self.cursors.get(route).map_err(engine)? {
            Some(v) => Ok(Some(position(&v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn put_deliveries(
        &self,
        db: &Database,
        all: &[DeliveryRecord],
    ) -> Result<(), StoreError> {
        // Not synced, as the cursor: the log of the last attempts before a power loss
        // may be missing; the events are not.
        let mut b = db.batch();
        for d in all {
            let mut key = delivery_prefix(&d.route);
            key.extend_from_slice(&d.key().to_bytes());
            b.insert(&self.deliveries, key, encode(d));
        }
        b.commit().map_err(engine)
    }

    pub(super) fn deliveries(
        &self,
        route: &str,
        before: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let prefix = delivery_prefix(route);
        let mut end = prefix.clone();
        let end = match before {
            Some(k) => {
                end.extend_from_slice(&k.to_bytes());
                Bound::Excluded(end)
            }
            None => {
                // Just past every key of the route: its prefix with `\0` raised to 1.
                end.pop();
                end.push(1);
                Bound::Excluded(end)
            }
        };
        let mut out = Vec::new();
        for kv in self
            .deliveries
            .range::<Vec<u8>, _>((Bound::Included(prefix), end))
            .rev()
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(engine)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub(super) fn prune(
        &self,
        db: &Database,
        events_before: u64,
        deliveries_before: u64,
    ) -> Result<u64, StoreError> {
        let mut b = Self::durable(db);
        let mut pruned = 0;
        // The newest event stays, however old: positions go on from it after a restart,
        // so an event id is never given twice and no route's cursor is ahead of the outbox.
        let newest = self.outbox_end();
        for kv in self.events.iter() {
            let (k, v) = kv.into_inner().map_err(engine)?;
            let event: OutboxRecord = decode(&k, &v)?;
            if event.at >= events_before || position(&k)? >= newest {
                break;
            }
            b.remove(&self.events, k);
            pruned += 1;
        }
        for route in self.routes()? {
            let start = delivery_prefix(&route.id);
            let mut end = start.clone();
            end.extend_from_slice(&deliveries_before.to_be_bytes());
            for kv in self.deliveries.range(start..end) {
                b.remove(&self.deliveries, kv.key().map_err(engine)?);
                pruned += 1;
            }
        }
        b.commit().map_err(engine)?;
        Ok(pruned)
    }
}

fn position(k: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(k.try_into().map_err(|_| {
        StoreError::Corrupt {
            key: format!("{k:?}"),
            reason: "an outbox position is 8 bytes".into(),
        }
    })?))
}

#[cfg(test)]
mod tests {
    use super::super::Engine;
    use crate::ThingRecord;
    use crate::Write;
    use crate::conformance::{delivery, event, id, route};

    /// Positions go on after a reopen, even once every event is older than the retention;
    /// a prune drops the events and delivery records older than its times, and no others
    /// but the newest event. (The rest is in the conformance suite.)
    #[test]
    fn positions_outlive_a_reopen_and_a_prune_drops_only_what_is_older() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = Engine::open(dir.path(), 3).unwrap();
            let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
            e.commit(&[Write::Thing(record), event("t1", 1, 10, &["r"])])
                .unwrap();
            e.commit(&[event("t2", 1, 11, &["r"]), event("t1", 2, 12, &["r"])])
                .unwrap();
        }
        let e = Engine::open(dir.path(), 3).unwrap();
        assert_eq!(e.outbox.outbox_end(), 3);
        e.commit(&[event("t2", 2, 13, &["r"])]).unwrap();
        assert_eq!(e.outbox.outbox(3, 1).unwrap()[0].0, 4);

        e.outbox.put_route(&e.db, &route("a")).unwrap();
        for (i, at) in [10, 20, 30].into_iter().enumerate() {
            e.outbox
                .put_deliveries(&e.db, &[delivery("a", i as u64 + 1, at)])
                .unwrap();
        }
        // Events written before 12 and records older than 20.
        assert_eq!(e.outbox.prune(&e.db, 12, 20).unwrap(), 3);
        let left: Vec<u64> = e
            .outbox
            .outbox(0, 10)
            .unwrap()
            .iter()
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(left, [3, 4]);
        let kept: Vec<u64> = e
            .outbox
            .deliveries("a", None, 5)
            .unwrap()
            .iter()
            .map(|d| d.at)
            .collect();
        assert_eq!(kept, [30, 20]);

        // However old every event is, the newest stays, and positions go on after it.
        assert_eq!(e.outbox.prune(&e.db, u64::MAX, 0).unwrap(), 1);
        drop(e);
        let e = Engine::open(dir.path(), 3).unwrap();
        assert_eq!(e.outbox.outbox_end(), 4);
        e.commit(&[event("t2", 3, 14, &["r"])]).unwrap();
        assert_eq!(e.outbox.outbox(4, 1).unwrap()[0].0, 5);
    }
}
