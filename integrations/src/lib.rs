//! Doppel's routes, delivered: every outbox event a route took goes to its destination
//! at least once, in order per thing.
//!
//! - [`signing`]: Standard Webhooks v1 signatures;
//! - [`webhook`]: one HTTP attempt, refused for non-public addresses unless allowed;
//! - [`redis_stream`] and [`kafka`]: one `XADD`, one produced message;
//! - [`sink`]: a route's destination, whichever kind;
//! - [`schedule`]: when a failed event is tried again;
//! - [`delivery`]: the outbox read per route, things delivered in parallel, each in
//!   order, the cursor and the delivery log kept.

pub mod delivery;
pub mod kafka;
pub mod redis_stream;
pub mod schedule;
pub mod signing;
pub mod sink;
pub mod webhook;

pub use delivery::{Deliveries, DeliveryConfig};

use ring::hmac;
use twin_store::routes::OutboxRecord;

/// An event as every destination receives it (the README documents this format).
pub fn event_body(position: u64, event: &OutboxRecord) -> String {
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

/// An event ready to send: its body, and the Standard Webhooks id, timestamp and
/// signature that go with it, as HTTP headers, Kafka headers or Redis stream fields.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    /// Seconds since the epoch, when it was signed.
    pub timestamp: u64,
    pub body: String,
    pub signature: String,
    pub thing: String,
    pub kind: &'static str,
}

impl Message {
    pub fn new(position: u64, event: &OutboxRecord, now_secs: u64, keys: &[hmac::Key]) -> Self {
        let id = twin_model::route::event_id(position);
        let body = event_body(position, event);
        let signature = signing::signature(keys, &id, now_secs, body.as_bytes());
        Self {
            id,
            timestamp: now_secs,
            body,
            signature,
            thing: event.thing.to_string(),
            kind: event.kind.as_str(),
        }
    }
}
