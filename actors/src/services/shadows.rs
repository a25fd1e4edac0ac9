//! Device shadows: update, read and delete, with AWS IoT Device Shadow semantics (the twin decides; see `twin_model::shadow`).

use std::sync::Arc;

use twin_model::history::{self, HistoryEntry, NotRetained, Origin};
use twin_model::{
    DeviceId, Rejection, RejectionKind, Shadow, ShadowChange, ShadowName, UpdateRequest,
};

use twin_telemetry::trace;

use crate::device::DeviceMsg;
use crate::error::FleetError;
use crate::fleet::{FleetHandle, Reply};

/// Device shadows (`fleet.shadows()`).
#[derive(Clone, Copy)]
pub struct Shadows<'a>(pub(crate) &'a FleetHandle);

impl Shadows<'_> {
    pub fn update(
        self,
        thing: &DeviceId,
        shadow: ShadowName,
        request: UpdateRequest,
        by: Origin,
    ) -> Reply<Arc<ShadowChange>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.update", %thing, shadow = shadow.name()),
        );
        self.0.request(thing, |reply, permit| DeviceMsg::Update {
            shadow,
            request: Box::new(request),
            by,
            span,
            reply,
            permit,
        })
    }

    pub fn get(self, thing: &DeviceId, shadow: ShadowName) -> Reply<Arc<Shadow>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.get", %thing, shadow = shadow.name()),
        );
        self.0.request(thing, |reply, permit| DeviceMsg::Get {
            shadow,
            span,
            reply,
            permit,
        })
    }

    pub fn delete(
        self,
        thing: &DeviceId,
        shadow: ShadowName,
        client_token: Option<String>,
        by: Origin,
    ) -> Reply<Arc<ShadowChange>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.delete", %thing, shadow = shadow.name()),
        );
        self.0.request(thing, |reply, permit| DeviceMsg::Delete {
            shadow,
            client_token,
            by,
            span,
            reply,
            permit,
        })
    }

    /// A shadow's retained changes, newest first: at most `limit`, those before the
    /// position `before` when given. Retention by count is the store's; retention by age
    /// (`history_retention`) is applied here, so both stores answer alike.
    pub async fn history(
        self,
        thing: &DeviceId,
        shadow: &ShadowName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, FleetError> {
        let mut entries = self
            .0
            .store()
            .history(thing, shadow, before, limit)
            .await
            .map_err(FleetError::from)?;
        if let Some(keep) = self.0.config().history_retention {
            let floor = self
                .0
                .now_millis()
                .saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
            let kept = entries.iter().take_while(|e| e.change.at >= floor).count();
            entries.truncate(kept);
        }
        Ok(entries)
    }

    /// The shadow as it was at `at` (milliseconds since the epoch), from its retained
    /// history: `Ok(None)` when it did not exist then, [`NotRetained`] when `at` is older
    /// than the history reaches. `Err` when the thing is not registered.
    pub async fn at(
        self,
        thing: &DeviceId,
        shadow: &ShadowName,
        at: u64,
    ) -> Result<Result<Option<Shadow>, NotRetained>, FleetError> {
        let current = self
            .0
            .queries()
            .thing(thing)
            .ok_or_else(|| {
                FleetError::Rejected(Rejection::new(
                    RejectionKind::NotFound,
                    format!("thing {thing} is not registered"),
                ))
            })?
            .shadow_now(shadow);
        let retained = self.history(thing, shadow, None, usize::MAX).await?;
        Ok(history::state_at(&retained, &current, at))
    }
}
