//! A Redis Streams destination: each event is one `XADD` to the route's stream, trimmed
//! to about `max_len` entries (`MAXLEN ~`, which lets Redis trim whole nodes cheaply).
//!
//! An entry's fields: `id` (the event id), `type`, `thing`, `event` (the event's JSON,
//! as every destination has it), and `webhook-timestamp` and `webhook-signature`, with
//! which a consumer can check with a Standard Webhooks library that Doppel sent it.
//! Redis assigns the entry's own id (`*`); a duplicate delivery (at least once) is a new
//! entry with the same `id` field.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::Message;
use crate::webhook::Attempt;

/// How long one `XADD` (and connecting) may take before the attempt counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisStream {
    connection: ConnectionManager,
    stream: String,
    max_len: u64,
}

impl RedisStream {
    /// Connects lazily: Redis down now is an attempt that fails later, not an error here.
    pub fn new(url: &str, stream: &str, max_len: u64) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("the Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(5));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot make the Redis client: {e}"))?;
        Ok(Self {
            connection,
            stream: stream.to_owned(),
            max_len,
        })
    }

    pub async fn send(&self, message: &Message) -> Attempt {
        let started = Instant::now();
        let mut connection = self.connection.clone();
        let added: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("id")
            .arg(&message.id)
            .arg("type")
            .arg(message.kind)
            .arg("thing")
            .arg(&message.thing)
            .arg("event")
            .arg(&message.body)
            .arg("webhook-timestamp")
            .arg(message.timestamp)
            .arg("webhook-signature")
            .arg(&message.signature)
            .query_async(&mut connection)
            .await;
        match added {
            Ok(entry) => Attempt::delivered(started, Some(format!("entry {entry}"))),
            Err(e) => Attempt::failed(started, format!("Redis: {e}")),
        }
    }
}
