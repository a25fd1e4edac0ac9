//! `TwinEvent`: the one event type everything downstream of a twin consumes (MQTT
//! publishes, subscriptions, webhooks, fan-out). Events are emitted only for accepted,
//! durable changes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::command::CommandExecution;
use crate::id::{DeviceId, ShadowName};
use crate::job::JobExecution;
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
        /// The twin's version after the change (see [`twin_version`]).
        version: u64,
        /// The W3C `traceparent` of the change's span when it was traced: what is sent
        /// because of the change (`update/accepted`, the delta) continues that trace.
        trace: Option<Arc<str>>,
    },
    /// The device connected or disconnected.
    Connectivity {
        thing: DeviceId,
        connectivity: Connectivity,
        /// The twin's version when it happened (presence does not change it).
        version: u64,
    },
    /// A command execution changed: created, delivered, answered or timed out.
    Command {
        thing: DeviceId,
        execution: Arc<CommandExecution>,
        /// The request is to go to the device's connection now.
        deliver: bool,
        /// The twin's version when it happened (commands do not change it).
        version: u64,
        /// The W3C `traceparent` of the span that made the change, when it was traced:
        /// the command request delivered to the device continues that trace.
        trace: Option<Arc<str>>,
    },
    /// A job execution changed. `notify` is the device's `jobs/notify` payload (its
    /// pending executions), `notify_next` its `jobs/notify-next` payload when the next
    /// pending execution changed.
    Job {
        thing: DeviceId,
        execution: Arc<JobExecution>,
        notify: Arc<serde_json::Value>,
        notify_next: Option<Arc<serde_json::Value>>,
        /// The twin's version when it happened.
        version: u64,
        /// The `traceparent` of the work that made it (a rollout's release, a device's
        /// request), carried to the device with its notifications (MQTT 5).
        trace: Option<Arc<str>>,
    },
    /// A telemetry reading was kept: the values as the device sent them, and the thing's
    /// latest values after it.
    Telemetry {
        thing: DeviceId,
        /// The topic it came on, and the reading's type from the topic, if it names one.
        topic: String,
        kind: Option<String>,
        values: Arc<serde_json::Map<String, serde_json::Value>>,
        /// When it was taken (the device's timestamp, or when it arrived), milliseconds.
        at: u64,
        latest: Arc<crate::telemetry::Latest>,
        /// The twin's version when it arrived (telemetry does not change it).
        version: u64,
    },
}

/// A twin's version: the sum of its shadows' versions. It grows by exactly one per
/// accepted shadow update (a delete keeps its shadow's version, so it keeps this one),
/// which lets a subscriber see a gap.
pub fn twin_version<'a>(shadow_versions: impl IntoIterator<Item = &'a Shadow>) -> u64 {
    shadow_versions.into_iter().map(|s| s.version).sum()
}

impl TwinEvent {
    /// The W3C `traceparent` of the span that made the change, when it was traced.
    pub fn trace(&self) -> Option<&Arc<str>> {
        match self {
            Self::Shadow { trace, .. } | Self::Command { trace, .. } | Self::Job { trace, .. } => {
                trace.as_ref()
            }
            _ => None,
        }
    }

    pub fn thing(&self) -> &DeviceId {
        match self {
            Self::Shadow { thing, .. }
            | Self::Connectivity { thing, .. }
            | Self::Command { thing, .. }
            | Self::Job { thing, .. }
            | Self::Telemetry { thing, .. } => thing,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Self::Shadow { version, .. }
            | Self::Connectivity { version, .. }
            | Self::Command { version, .. }
            | Self::Job { version, .. }
            | Self::Telemetry { version, .. } => *version,
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
