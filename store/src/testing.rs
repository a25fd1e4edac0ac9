//! A store for testing what sits on top of one (feature `test-util`): its commits wait at
//! a gate until the test opens it, so that work piles up behind them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use twin_model::command::CommandExecution;
use twin_model::job::{JobDefinition, JobStatus};
use twin_model::{DeviceId, ShadowChange, ShadowName};

use crate::{Scanned, StoreError, ThingRecord, TwinSnapshot, TwinStore, Write};

/// Reads find nothing, except that with `registered` every thing exists. Every commit
/// notifies `arrived`, waits until `released`, is recorded in `batches` (its size), and
/// fails when `fail`.
#[derive(Default)]
pub struct GatedStore {
    pub registered: bool,
    pub released: AtomicBool,
    pub fail: AtomicBool,
    pub batches: Mutex<Vec<usize>>,
    pub arrived: tokio::sync::Notify,
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

impl TwinStore for GatedStore {
    fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        let record = self.registered.then(|| ThingRecord {
            id: thing.clone(),
            secret_hash: String::new(),
            enabled: true,
            created_at: 0,
            attributes: Default::default(),
        });
        Ok(TwinSnapshot {
            record,
            ..TwinSnapshot::default()
        })
    }
    fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        self.arrived.notify_one();
        while !self.released.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.batches.lock().unwrap().push(batch.len());
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("disk on fire".into()));
        }
        Ok(())
    }
    fn history(
        &self,
        _: &DeviceId,
        _: &ShadowName,
        _: usize,
    ) -> Result<Vec<ShadowChange>, StoreError> {
        Ok(vec![])
    }
    fn thing(&self, _: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        Ok(None)
    }
    fn things(&self, _: Option<&DeviceId>, _: usize) -> Result<Vec<ThingRecord>, StoreError> {
        Ok(vec![])
    }
    fn job(&self, _: &str) -> Result<Option<JobDefinition>, StoreError> {
        Ok(None)
    }
    fn jobs(&self, _: Option<&str>, _: usize) -> Result<Vec<JobDefinition>, StoreError> {
        Ok(vec![])
    }
    fn job_statuses(&self, _: &str) -> Result<Vec<(DeviceId, JobStatus)>, StoreError> {
        Ok(vec![])
    }
    fn command(&self, _: &str) -> Result<Option<CommandExecution>, StoreError> {
        Ok(None)
    }
    fn commands(
        &self,
        _: &DeviceId,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<CommandExecution>, StoreError> {
        Ok(vec![])
    }
    fn scan(&self, _: &mut dyn FnMut(Scanned)) -> Result<(), StoreError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
