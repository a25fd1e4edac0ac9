//! Doppel's routes, delivered: every outbox event a route took goes to its destination
//! at least once, in order per thing.
//!
//! - [`signing`]: Standard Webhooks v1 signatures;
//! - [`webhook`]: one HTTP attempt, refused for non-public addresses unless allowed;
//! - [`schedule`]: when a failed event is tried again;
//! - [`delivery`]: the outbox read per route, things delivered in parallel, each in
//!   order, the cursor and the delivery log kept.

pub mod delivery;
pub mod schedule;
pub mod signing;
pub mod webhook;

pub use delivery::{Deliveries, DeliveryConfig};

/// An event as every destination receives it (the README documents this format).
pub fn event_body(position: u64, event: &twin_store::routes::OutboxRecord) -> String {
    serde_json::json!({
        "id": twin_model::route::event_id(position),
        "type": event.kind,
        "thing": event.thing,
        "seq": event.seq,
        "timestamp": twin_model::rfc3339(event.at),
        "data": event.data,
    })
    .to_string()
}
