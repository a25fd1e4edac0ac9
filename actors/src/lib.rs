//! Doppel's twin actors.
//!
//! - [`device`]: `DeviceTwin`, one actor per thing, the single writer of its shadows;
//! - [`shard`]: `ShardSupervisor`, which activates, passivates and restarts twins;
//! - [`fleet`]: [`FleetHandle`]: starts the fleet and routes requests to twins;
//! - [`services`]: the typed APIs every edge (MQTT, GraphQL, ...) uses, one per concern:
//!   shadows, registry, device sessions, commands, jobs, queries;
//! - [`pipeline`]: the post-commit change pipeline and its consumers;
//! - [`index`]: the fleet index every query and filtered subscription reads;
//! - [`rollout`]: one controller per job that releases executions at the job's pace;
//! - [`loading`]: what a starting node reads (index and deadlines, by partition).
//!
//! A change is acknowledged only after it is durable (through the group
//! [`twin_store::Committer`]); then the twin hands it to the [`pipeline::Pipeline`],
//! which updates the index and tells every consumer: the device's [`DeviceLink`] (its
//! MQTT session), the fleet-wide event stream and the job's rollout controller.

pub mod clock;
pub mod device;
pub mod device_ca;
pub mod error;
pub mod fleet;
pub mod index;
pub mod loading;
pub mod pipeline;
pub mod rollout;
pub mod routing;
pub mod services;
pub mod shard;
pub mod telemetry;

pub use clock::Clock;
pub use device::{RegistryOp, TelemetryMessage};
pub use error::{FleetError, JobRequestError};
pub use fleet::{ConnectOk, FleetConfig, FleetHandle, Reply};
pub use index::{Page, ShadowView, TwinView};
pub use pipeline::{Change, Committed, CommittedChange, Consumer, DeviceLink, SessionEnd};
pub use shard::shard_for;

#[cfg(test)]
mod tests;
