//! The device registry: register a thing, change its attributes, enable or disable it, rotate its secret, delete it.

use serde_json::{Map, Value};
use twin_model::DeviceId;

use crate::device::{DeviceMsg, RegistryOp};
use crate::error::FleetError;
use crate::fleet::{FleetHandle, Reply};

/// The device registry (`fleet.registry()`).
#[derive(Clone, Copy)]
pub struct Registry<'a>(pub(crate) &'a FleetHandle);

impl Registry<'_> {
    /// Changes a thing's registry record; see [`RegistryOp`]. The answer is the new
    /// secret for `Register` and `RotateSecret` (not stored: it cannot be shown again).
    pub fn apply(self, thing: &DeviceId, op: RegistryOp) -> Reply<Option<String>> {
        self.0.request(thing, |reply, permit| DeviceMsg::Registry {
            op,
            reply,
            permit,
        })
    }

    /// Registers a thing; the answer is its secret.
    pub fn register(self, thing: &DeviceId, attributes: Map<String, Value>) -> Reply<String> {
        let answer = self.apply(thing, RegistryOp::Register(attributes));
        Box::pin(async move {
            answer
                .await?
                .ok_or_else(|| FleetError::Inconsistent("registration made no secret".into()))
        })
    }

    /// Enables or disables a thing; disabling ends its live connection.
    pub fn set_enabled(self, thing: &DeviceId, enabled: bool) -> Reply<()> {
        let answer = self.apply(thing, RegistryOp::SetEnabled(enabled));
        Box::pin(async move { answer.await.map(drop) })
    }
}
