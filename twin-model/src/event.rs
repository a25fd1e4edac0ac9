//! `TwinEvent`: the one event type everything downstream of a twin consumes (MQTT
//! publishes, subscriptions, webhooks, fan-out). Events are emitted only for accepted,
//! durable changes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, ShadowName};
use crate::shadow::{Shadow, ShadowChange};

#[derive(Debug, Clone, PartialEq)]
pub enum TwinEvent {
    /// A shadow was updated or deleted. `previous` and `current` are the whole shadow
    /// before and after; the delta is `current.delta()`.
    Shadow {
        thing: DeviceId,
        shadow: ShadowName,
        change: Arc<ShadowChange>,
        previous: Arc<Shadow>,
        current: Arc<Shadow>,
    },
    /// The device connected or disconnected.
    Connectivity {
        thing: DeviceId,
        connectivity: Connectivity,
    },
}

impl TwinEvent {
    pub fn thing(&self) -> &DeviceId {
        match self {
            Self::Shadow { thing, .. } | Self::Connectivity { thing, .. } => thing,
        }
    }
}

/// A device's presence as the platform last saw it. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connectivity {
    pub connected: bool,
    /// When `connected` last changed.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
}
