//! What a starting node reads from the store: the fleet index and the pending deadlines,
//! one placement partition at a time ([`twin_model::PARTITIONS`]), a few partitions at
//! once. Nothing else is read at start: twins load their own state when first needed.
//! A node of a cluster reads the whole index but no deadlines: it reads a shard's
//! deadlines when it takes the shard.

use std::sync::Arc;

use tokio::task::JoinSet;
use twin_store::{Deadline, StoreError, TwinStore};

use crate::index::FleetIndex;

/// Partitions read at the same time.
const PARALLEL: usize = 8;
/// Things (or deadlines) per store call.
const PAGE: usize = 1000;

/// Loads `partitions` into `index`; returns their pending deadlines (none unless
/// `with_deadlines`).
pub async fn load(
    store: Arc<dyn TwinStore>,
    index: Arc<FleetIndex>,
    partitions: Vec<u16>,
    with_deadlines: bool,
) -> Result<Vec<Deadline>, StoreError> {
    let mut workers = JoinSet::new();
    for worker in 0..PARALLEL {
        let mine: Vec<u16> = partitions
            .iter()
            .copied()
            .skip(worker)
            .step_by(PARALLEL)
            .collect();
        let (store, index) = (store.clone(), index.clone());
        workers.spawn(async move {
            let mut deadlines = Vec::new();
            for partition in mine {
                load_partition(&*store, &index, partition).await?;
                if with_deadlines {
                    deadlines.extend(partition_deadlines(&*store, partition).await?);
                }
            }
            Ok::<_, StoreError>(deadlines)
        });
    }
    let mut deadlines = Vec::new();
    while let Some(done) = workers.join_next().await {
        let found = done.map_err(|e| StoreError::Engine(format!("loading panicked: {e}")))??;
        deadlines.extend(found);
    }
    Ok(deadlines)
}

async fn load_partition(
    store: &dyn TwinStore,
    index: &FleetIndex,
    partition: u16,
) -> Result<(), StoreError> {
    read_partition(store, partition, |twin| index.load(twin)).await
}

/// Refreshes `index` with the twins of `partition` as stored (a shard just taken on: its
/// previous owner changed them since this node read them); returns those stored as
/// connected.
pub(crate) async fn refresh_partition(
    store: &dyn TwinStore,
    index: &FleetIndex,
    partition: u16,
) -> Result<Vec<twin_model::DeviceId>, StoreError> {
    let mut connected = Vec::new();
    read_partition(store, partition, |twin| {
        if twin.connectivity.connected {
            connected.push(twin.record.id.clone());
        }
        index.refresh(twin);
    })
    .await?;
    Ok(connected)
}

async fn read_partition(
    store: &dyn TwinStore,
    partition: u16,
    mut each: impl FnMut(twin_store::IndexedTwin),
) -> Result<(), StoreError> {
    let mut after = None;
    loop {
        let page = store.index_page(partition, after.as_ref(), PAGE).await?;
        for twin in page.twins {
            each(twin);
        }
        after = page.next;
        if after.is_none() {
            return Ok(());
        }
    }
}

pub(crate) async fn partition_deadlines(
    store: &dyn TwinStore,
    partition: u16,
) -> Result<Vec<Deadline>, StoreError> {
    let mut all: Vec<Deadline> = Vec::new();
    loop {
        let after = all.last().map(|d| (&d.thing, d.item.as_str()));
        let page = store.pending_deadlines(partition, after, PAGE).await?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}
