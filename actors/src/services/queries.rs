//! Reading the fleet: a twin by id, filtered pages of twins, and the stream of changes.

use std::sync::Arc;

use tokio::sync::broadcast;
use twin_model::{DeviceId, Filter};

use crate::fleet::FleetHandle;
use crate::index::{Page, TwinView};
use crate::pipeline::Change;

/// Reading the fleet (`fleet.queries()`).
#[derive(Clone, Copy)]
pub struct Queries<'a>(pub(crate) &'a FleetHandle);

impl Queries<'_> {
    /// A registered twin as it is now (resident or not).
    pub fn thing(self, thing: &DeviceId) -> Option<Arc<TwinView>> {
        self.0.twins.pipeline.index().get(thing)
    }

    /// Registered twins matching `filter`, in id order after `after`.
    pub fn query(self, filter: Option<&Filter>, after: Option<&DeviceId>, first: usize) -> Page {
        self.0.twins.pipeline.index().query(filter, after, first)
    }

    /// Whether a registered twin matches `filter` now.
    pub fn matches(self, thing: &DeviceId, filter: &Filter) -> bool {
        self.0.twins.pipeline.index().matches(thing, filter)
    }

    /// Every change of every twin but telemetry readings. A receiver that falls behind
    /// by more than the buffer gets `RecvError::Lagged` and must resynchronize.
    pub fn subscribe(self) -> broadcast::Receiver<Change> {
        self.0.subscribers.subscribe()
    }

    /// Every telemetry reading of every twin, as [`subscribe`](Self::subscribe) does.
    pub fn subscribe_telemetry(self) -> broadcast::Receiver<Change> {
        self.0.subscribers.subscribe_telemetry()
    }
}
