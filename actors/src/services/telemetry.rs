//! Device telemetry (`fleet.telemetry()`): readings go through the thing's twin (the
//! single writer of its latest values); series are read from the store.

use twin_model::telemetry::Series;
use twin_model::{DeviceId, Rejection, RejectionKind};

use crate::device::{DeviceMsg, TelemetryMessage};
use crate::error::FleetError;
use crate::fleet::{FleetHandle, Reply};

/// Device telemetry (`fleet.telemetry()`).
#[derive(Clone, Copy)]
pub struct Telemetry<'a>(pub(crate) &'a FleetHandle);

impl Telemetry<'_> {
    /// Keeps a device's telemetry message; answers once it is durable.
    pub fn record(self, thing: &DeviceId, message: TelemetryMessage) -> Reply<()> {
        self.0.request(thing, |reply, permit| DeviceMsg::Telemetry {
            message: Box::new(message),
            reply,
            permit,
        })
    }

    /// The buckets of a registered thing's readings of `key` in `series`' range.
    pub async fn series(
        self,
        thing: &DeviceId,
        key: &str,
        series: Series,
    ) -> Result<Series, FleetError> {
        if self.0.queries().thing(thing).is_none() {
            return Err(Rejection::new(
                RejectionKind::NotFound,
                format!("thing {thing} is not registered"),
            )
            .into());
        }
        Ok(self.0.store().telemetry_series(thing, key, series).await?)
    }

    /// Drops readings older than `before` (milliseconds); returns the days dropped.
    pub async fn prune(self, before: u64) -> Result<u64, FleetError> {
        Ok(self.0.store().prune_telemetry(before).await?)
    }
}
