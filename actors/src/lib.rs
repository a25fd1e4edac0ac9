//! Doppel's twin actors.
//!
//! - [`device`]: `DeviceTwin`, one actor per thing, the single writer of its shadows;
//! - [`shard`]: `ShardSupervisor`, which activates, passivates and restarts twins;
//! - [`fleet`]: [`FleetHandle`], the API every edge (MQTT, GraphQL, ...) uses;
//! - [`index`]: the fleet index every query and filtered subscription reads.
//!
//! A change is acknowledged only after it is durable (through the group
//! [`twin_store::Committer`]); then the twin emits a [`twin_model::TwinEvent`] to the
//! device's [`DeviceLink`] (its MQTT session) and to the fleet-wide event stream.

pub mod clock;
pub mod device;
pub mod error;
pub mod fleet;
pub mod index;
pub mod loading;
pub mod pipeline;
pub mod rollout;
pub mod shard;

pub use clock::Clock;
pub use device::{JobAnswer, RegistryOp};
pub use error::FleetError;
pub use fleet::{ConnectOk, FleetConfig, FleetHandle, Reply};
pub use index::{Page, ShadowView, TwinView};
pub use pipeline::{Change, Committed, CommittedChange, Consumer, DeviceLink};
pub use shard::shard_for;

#[cfg(test)]
mod tests;
