//! Device shadows: update, read and delete, with AWS IoT Device Shadow semantics (the twin decides; see `twin_model::shadow`).

use std::sync::Arc;

use twin_model::{DeviceId, Shadow, ShadowChange, ShadowName, UpdateRequest};

use crate::device::DeviceMsg;
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
    ) -> Reply<Arc<ShadowChange>> {
        self.0.request(thing, |reply, permit| DeviceMsg::Update {
            shadow,
            request: Box::new(request),
            reply,
            permit,
        })
    }

    pub fn get(self, thing: &DeviceId, shadow: ShadowName) -> Reply<Arc<Shadow>> {
        self.0.request(thing, |reply, permit| DeviceMsg::Get {
            shadow,
            reply,
            permit,
        })
    }

    pub fn delete(
        self,
        thing: &DeviceId,
        shadow: ShadowName,
        client_token: Option<String>,
    ) -> Reply<Arc<ShadowChange>> {
        self.0.request(thing, |reply, permit| DeviceMsg::Delete {
            shadow,
            client_token,
            reply,
            permit,
        })
    }
}
