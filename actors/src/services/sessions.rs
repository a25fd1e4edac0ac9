//! Device sessions: a device connecting and disconnecting, and where its twin delivers its events while it is connected.

use std::sync::Arc;

use twin_model::DeviceId;

use crate::device::DeviceMsg;
use crate::fleet::{ConnectOk, FleetHandle, Reply};
use crate::pipeline::DeviceLink;

/// Device sessions (`fleet.sessions()`).
#[derive(Clone, Copy)]
pub struct DeviceSessions<'a>(pub(crate) &'a FleetHandle);

impl DeviceSessions<'_> {
    /// Authenticates a device and marks it connected.
    pub fn connect(self, thing: &DeviceId, password: Option<String>) -> Reply<ConnectOk> {
        self.0.request(thing, |reply, permit| DeviceMsg::Connect {
            password,
            reply,
            permit,
        })
    }

    /// Marks the device disconnected, unless a newer session has replaced `session`.
    pub fn disconnected(self, thing: &DeviceId, session: u64, reason: impl Into<String>) {
        let msg = DeviceMsg::Disconnected {
            session,
            reason: reason.into(),
        };
        if let Err(e) = self.0.route(thing, msg) {
            tracing::debug!(%thing, error = %e, "disconnect not recorded");
        }
    }

    /// Routes the events of `thing` to `link` (replacing a previous link).
    pub fn attach(self, thing: &DeviceId, link: Arc<dyn DeviceLink>) {
        self.0.links.attach(thing, link);
    }

    /// Stops routing to `link`, if it is still the thing's link.
    pub fn detach(self, thing: &DeviceId, link: &Arc<dyn DeviceLink>) {
        self.0.links.detach(thing, link);
    }

    /// The connection of `session` subscribed to its thing's command requests.
    pub fn commands_wanted(self, thing: &DeviceId, session: u64) {
        if let Err(e) = self.0.route(thing, DeviceMsg::CommandsWanted { session }) {
            tracing::debug!(%thing, error = %e, "pending commands not delivered");
        }
    }
}
