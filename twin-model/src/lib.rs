//! Doppel's domain model: pure data and functions, no runtime, no IO, no clock.
//!
//! - [`id`]: validated thing and shadow names;
//! - [`shadow`]: AWS IoT Device Shadow semantics (decide / apply, delta, payloads);
//! - [`event`]: [`TwinEvent`], what every consumer of a twin reads;
//! - [`topic`]: the MQTT topic names of the device API.

pub mod event;
pub mod id;
pub mod json;
pub mod rejection;
pub mod shadow;
pub mod topic;

pub use event::{Connectivity, TwinEvent};
pub use id::{DeviceId, NameError, ShadowName};
pub use rejection::{Rejection, RejectionKind};
pub use shadow::{ChangeOp, Limits, SectionPatch, Shadow, ShadowChange, UpdateRequest};
