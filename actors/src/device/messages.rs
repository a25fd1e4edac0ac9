//! Messages of the `DeviceTwin` actor.

use std::sync::Arc;

use ractor::RpcReplyPort;
use tokio::sync::OwnedSemaphorePermit;
use twin_model::{Shadow, ShadowChange, ShadowName, UpdateRequest};

use crate::error::FleetError;
use crate::fleet::ConnectOk;

pub type Port<T> = RpcReplyPort<Result<T, FleetError>>;

pub enum DeviceMsg {
    Update {
        shadow: ShadowName,
        request: Box<UpdateRequest>,
        reply: Port<Arc<ShadowChange>>,
        permit: OwnedSemaphorePermit,
    },
    Get {
        shadow: ShadowName,
        reply: Port<Arc<Shadow>>,
        permit: OwnedSemaphorePermit,
    },
    Delete {
        shadow: ShadowName,
        client_token: Option<String>,
        reply: Port<Arc<ShadowChange>>,
        permit: OwnedSemaphorePermit,
    },
    /// A device authenticates and comes online.
    Connect {
        password: Option<String>,
        reply: Port<ConnectOk>,
        permit: OwnedSemaphorePermit,
    },
    /// The connection of `session` ended.
    Disconnected { session: u64, reason: String },
    /// Registers the thing; replies with its new secret (shown once).
    Register {
        reply: Port<String>,
        permit: OwnedSemaphorePermit,
    },
    SetEnabled {
        enabled: bool,
        reply: Port<()>,
        permit: OwnedSemaphorePermit,
    },
    /// Test hook: panics inside the actor.
    #[cfg(test)]
    Crash,
}
