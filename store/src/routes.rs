//! Routes and their outbox: what Doppel keeps so that every event a route selects reaches
//! its destination at least once, in order per thing, across restarts.
//!
//! - A twin writes an [`OutboxRecord`] in the same commit as the change it describes
//!   ([`Write::Event`](crate::Write::Event)), naming the routes whose event types and
//!   filter it matched right after the change. The store gives it a position: outbox
//!   positions grow in commit order, so a thing's events are in its order.
//! - Each route keeps a durable cursor: every event at or before it is done (delivered,
//!   or given up after the whole retry schedule).
//! - Each attempt is a [`DeliveryRecord`] in the route's delivery log.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use twin_model::DeviceId;
use twin_model::route::EventType;

/// Where a route's events go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Destination {
    /// An HTTPS (or, where allowed, HTTP) endpoint, signed as Standard Webhooks v1 says.
    Webhook { url: String, timeout_secs: u32 },
    /// `XADD` to a Redis stream, trimmed to about `max_len` entries (`MAXLEN ~`).
    #[serde(rename_all = "camelCase")]
    RedisStream {
        url: String,
        stream: String,
        max_len: u64,
    },
    /// A Kafka topic; each message's key is its thing's id.
    Kafka { brokers: String, topic: String },
}

impl Destination {
    /// `webhook`, `redisStream` or `kafka`: what logs and metrics call it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Webhook { .. } => "webhook",
            Self::RedisStream { .. } => "redisStream",
            Self::Kafka { .. } => "kafka",
        }
    }
}

/// A webhook signing secret (`whsec_<base64>`). A rotated-out secret keeps signing
/// until `expires_at` (milliseconds), so receivers can switch without a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SigningSecret {
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRecord {
    pub id: String,
    pub name: String,
    pub events: Vec<EventType>,
    /// In the fleet filter language, evaluated on the thing right after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub destination: Destination,
    /// Newest first. Kept in the database: signing needs the secret itself.
    pub secrets: Vec<SigningSecret>,
    pub paused: bool,
    /// Why the route was disabled (its endpoint answered 410, or failed for too long);
    /// a disabled route delivers nothing until it is resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    /// The outbox position the route started at: it carries events after it.
    pub start: u64,
    /// The newest replay asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

/// A replay: the route's delivery goes back to just after `from` and delivers again the
/// events written between `since` and `until` (milliseconds); past `upto` (where it had
/// read to when asked) it goes on as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    /// Tells replays apart: a delivery starts each one once.
    pub id: u64,
    pub from: u64,
    pub upto: u64,
    pub since: u64,
    pub until: u64,
    /// Only this event (a redelivery), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<u64>,
}

impl Replay {
    /// Whether the event at `position`, written at `at`, is delivered again.
    pub fn includes(&self, position: u64, at: u64) -> bool {
        position > self.upto
            || ((self.since..=self.until).contains(&at) && self.only.is_none_or(|p| p == position))
    }
}

/// One event in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRecord {
    pub thing: DeviceId,
    /// The thing's own event number: grows by one with each of its events in the outbox.
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Milliseconds since the epoch.
    pub at: u64,
    pub data: Value,
    /// The routes whose event types and filter it matched when it was written.
    pub routes: Vec<String>,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    /// The destination took it (a 2xx).
    Delivered,
    /// It failed and will be tried again.
    Retrying,
    /// It failed for the last time: the retry schedule ended, or the route was disabled.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    pub route: String,
    /// The event's outbox position (its id is [`twin_model::route::event_id`] of it).
    pub position: u64,
    pub thing: DeviceId,
    pub seq: u64,
    pub kind: EventType,
    /// 1 for the first attempt; a replay or redelivery counts on.
    pub attempt: u32,
    /// When the attempt ended, milliseconds since the epoch.
    pub at: u64,
    pub status: DeliveryStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
    /// The start of the response body, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

impl DeliveryRecord {
    /// Where the record sits in its route's log: newest last.
    pub fn key(&self) -> DeliveryKey {
        DeliveryKey {
            at: self.at,
            position: self.position,
            attempt: self.attempt,
        }
    }
}

/// A place in a route's delivery log, for paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeliveryKey {
    pub at: u64,
    pub position: u64,
    pub attempt: u32,
}

impl DeliveryKey {
    pub fn to_bytes(self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.at.to_be_bytes());
        b[8..16].copy_from_slice(&self.position.to_be_bytes());
        b[16..].copy_from_slice(&self.attempt.to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 20] = b.try_into().ok()?;
        Some(Self {
            at: u64::from_be_bytes(b[..8].try_into().ok()?),
            position: u64::from_be_bytes(b[8..16].try_into().ok()?),
            attempt: u32::from_be_bytes(b[16..].try_into().ok()?),
        })
    }
}
